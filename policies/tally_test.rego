# Tests of the default policy: at least one per rule. Run: tally policy test policies/
package tally_test

import rego.v1

import data.tally

identity := {"user": "analyst", "groups": ["analysts"], "project": "uec-demand", "purpose": "planning"}

# --- Building releases and their policy input ----------------------------------------------------

col(table, column) := {"table": table, "column": column}

dim(table, column, generaliser) := {"column": col(table, column), "generaliser": generaliser}

count_rows := {"function": "count_rows"}

agg(function, table, column) := {"function": function, "column": col(table, column)}

# A column use, classed as the gateway and nodes class it: from the catalogue, or unclassified.
use(table, column, usage, generaliser) := {
	"table": table,
	"column": column,
	"class": object.get(data.governance.catalogue, [table, "columns", column, "class"], "unclassified"),
	"usage": usage,
	"generaliser": generaliser,
}

# The action for release r. The filter is a tree, so its column uses are listed by the test.
action_of(r, filter_uses) := {
	"kind": "release",
	"release": r,
	"tables": array.concat([r.fact], object.get(r, "joins", [])),
	"columns": array.concat(
		array.concat(
			[use(d.column.table, d.column.column, "group_by", d.generaliser) | some d in object.get(r, "group_by", [])],
			filter_uses,
		),
		[use(a.column.table, a.column.column, "aggregate", null) | some a in r.aggregates; a.column],
	),
	"aggregates": [a.function | some a in r.aggregates],
}

# SELECT age_band(age_at_admission), COUNT(*), AVG(cost) FROM episodes JOIN patients
# WHERE cost > 5000 GROUP BY 1
example := {
	"version": 1,
	"fact": "episodes",
	"joins": ["patients"],
	"filter": {"op": "compare", "on": dim("episodes", "cost", null), "cmp": "gt", "value": {"type": "float", "value": 5000.0}},
	"group_by": [dim("episodes", "age_at_admission", "age_band")],
	"aggregates": [count_rows, agg("mean", "episodes", "cost")],
}

example_action := action_of(example, [use("episodes", "cost", "filter", null)])

# SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty
by_specialty := {"version": 1, "fact": "episodes", "group_by": [dim("episodes", "specialty", null)], "aggregates": [count_rows]}

# by_specialty with some fields replaced, and no filter.
variant(changes) := action_of(object.union(by_specialty, changes), [])

# by_specialty with a filter testing the column uses given.
filtered(filter_uses) := action_of(by_specialty, filter_uses)

decide_as(action, who, origin) := d if {
	d := tally.decision with input as {"context": {"identity": who, "origin": origin}, "action": action}
}

decide(action, who) := decide_as(action, who, "analyst")

codes(action) := {r.code | some r in decide(action, identity).reasons}

codes_of(d) := {r.code | some r in d.reasons}

# --- Allowed -------------------------------------------------------------------------------------

test_example_release_is_allowed if {
	d := decide(example_action, identity)
	d.allow
	d.reasons == []
	d.obligations == {
		"apply_opt_out": true,
		"trusts": ["RXA", "RXB", "RXC"],
		"budget": {"dataset": "hes", "rho_per_release": 0.05, "rho_cap": 2},
	}
}

# --- Privacy budget --------------------------------------------------------------------------------

decide_with_spent(spent) := d if {
	d := tally.decision with input as {
		"context": {"identity": identity, "origin": "analyst", "budget": {"spent": spent}},
		"action": example_action,
	}
}

test_a_release_within_the_budget_is_allowed if {
	decide_with_spent(1.9).allow
}

test_a_release_past_the_budget_is_refused if {
	d := decide_with_spent(1.99)
	not d.allow
	codes_of(d) == {"E_BUDGET_EXHAUSTED"}
}

test_a_repeat_is_allowed_past_the_budget if {
	d := tally.decision with input as {
		"context": {"identity": identity, "origin": "analyst", "budget": {"spent": 2, "repeat": true}},
		"action": example_action,
	}
	d.allow
}

test_a_project_budget_overrides_the_default if {
	d := tally.decision with input as {
		"context": {"identity": identity, "origin": "analyst", "budget": {"spent": 1.5}},
		"action": example_action,
	}
		with data.governance.projects["uec-demand"].budget as {"rho_cap": 2, "rho_per_release": 0.1}
	d.allow
	d.obligations.budget == {"dataset": "hes", "rho_per_release": 0.1, "rho_cap": 2}
}

test_count_by_specialty_is_allowed if {
	decide(variant({}), identity).allow
}

test_code_range_join_is_allowed if {
	decide(variant({"joins": ["icd10_chapters"], "group_by": [dim("icd10_chapters", "chapter", null)]}), identity).allow
}

test_every_allowed_aggregate_is_allowed if {
	aggregates := [
		count_rows,
		agg("count", "episodes", "specialty"),
		agg("sum", "episodes", "length_of_stay"),
		agg("mean", "episodes", "cost"),
		{"function": "variance", "column": col("episodes", "cost"), "population": false},
		{"function": "std_dev", "column": col("episodes", "length_of_stay"), "population": true},
	]
	decide(variant({"aggregates": aggregates}), identity).allow
}

test_quasi_identifier_marked_aggregate_may_be_averaged if {
	decide(variant({"aggregates": [agg("mean", "episodes", "age_at_admission")]}), identity).allow
}

test_postcode_district_is_allowed if {
	decide(variant({"joins": ["patients"], "group_by": [dim("patients", "postcode", "postcode_district")]}), identity).allow
}

test_generalised_date_filter_is_allowed if {
	decide(filtered([use("episodes", "admission_date", "filter", "year")]), identity).allow
}

test_bare_quasi_identifier_filter_is_allowed if {
	decide(filtered([use("episodes", "admission_date", "filter", null)]), identity).allow
}

# --- Who may ask, for what ----------------------------------------------------------------------

test_unknown_project_refused if {
	d := decide(example_action, object.union(identity, {"project": "nope"}))
	not d.allow
	"E_PROJECT" in codes_of(d)
	d.obligations.trusts == []
}

test_empty_input_refused if {
	d := tally.decision with input as {}
	not d.allow
	"E_PROJECT" in codes_of(d)
}

test_unapproved_purpose_refused if {
	d := decide(variant({}), object.union(identity, {"project": "cardiac-audit", "purpose": "planning"}))
	codes_of(d) == {"E_PURPOSE"}
}

test_missing_purpose_refused if {
	who := {"user": "analyst", "groups": [], "project": "uec-demand"}
	"E_PURPOSE" in codes_of(decide(variant({}), who))
}

test_direct_care_refused_even_when_a_project_lists_it if {
	projects := object.union(data.governance.projects, {"uec-demand": object.union(
		data.governance.projects["uec-demand"],
		{"purposes": ["planning", "direct_care"]},
	)})
	d := tally.decision with input as {"context": {"identity": object.union(identity, {"purpose": "direct_care"}), "origin": "analyst"}, "action": variant({})}
		with data.governance.projects as projects
	codes_of(d) == {"E_PURPOSE"}
}

test_table_outside_project_refused if {
	d := decide(example_action, object.union(identity, {"project": "cardiac-audit", "purpose": "research"}))
	codes_of(d) == {"E_TABLE_NOT_ALLOWED"}
}

# --- Query shape ---------------------------------------------------------------------------------

test_undeclared_join_refused if {
	"E_QUERY_SHAPE" in codes(variant({"joins": ["prescriptions"]}))
}

test_join_declared_only_from_another_fact_refused if {
	# patients declares no relationships: icd10_chapters joins episodes only.
	"E_QUERY_SHAPE" in codes(variant({"fact": "patients", "joins": ["icd10_chapters"], "group_by": [dim("patients", "sex", null)]}))
}

test_fact_without_privacy_unit_refused if {
	"E_QUERY_SHAPE" in codes(variant({"fact": "icd10_chapters", "group_by": [dim("icd10_chapters", "chapter", null)]}))
}

test_other_action_kind_refused if {
	"E_QUERY_SHAPE" in codes(object.union(example_action, {"kind": "sql"}))
}

test_max_refused if {
	"E_AGG_NOT_ALLOWED" in codes(variant({"aggregates": [agg("max", "episodes", "cost")]}))
}

test_median_refused if {
	"E_AGG_NOT_ALLOWED" in codes(variant({"aggregates": [agg("median", "episodes", "cost")]}))
}

# --- Column classes ------------------------------------------------------------------------------

test_identifier_grouped_refused if {
	"E_IDENTIFIER_COLUMN" in codes(variant({"joins": ["patients"], "group_by": [dim("patients", "nhs_number", null)]}))
}

test_identifier_filtered_refused if {
	codes(filtered([use("episodes", "person_id", "filter", null)])) == {"E_IDENTIFIER_COLUMN"}
}

test_identifier_counted_refused if {
	codes(variant({"aggregates": [agg("count", "episodes", "episode_id")]})) == {"E_IDENTIFIER_COLUMN"}
}

test_unclassified_column_refused if {
	"E_UNCLASSIFIED_COLUMN" in codes(variant({"group_by": [dim("episodes", "secret", null)]}))
}

test_bare_quasi_identifier_group_refused if {
	codes(variant({"joins": ["patients"], "group_by": [dim("patients", "postcode", null)]})) == {"E_QUASI_IDENTIFIER"}
}

test_undeclared_generaliser_refused if {
	codes(variant({"group_by": [dim("episodes", "age_at_admission", "month")]})) == {"E_QUASI_IDENTIFIER"}
}

test_quasi_identifier_without_generalisers_cannot_be_grouped if {
	"E_QUASI_IDENTIFIER" in codes(variant({"joins": ["patients"], "group_by": [dim("patients", "year_of_birth", "year")]}))
}

test_generaliser_of_a_dimension_refused if {
	"E_QUASI_IDENTIFIER" in codes(filtered([use("episodes", "specialty", "filter", "month")]))
}

test_measure_grouped_refused if {
	codes(variant({"group_by": [dim("episodes", "cost", null)]})) == {"E_MEASURE_USAGE"}
}

test_dimension_summed_refused if {
	codes(variant({"aggregates": [agg("sum", "episodes", "specialty")]})) == {"E_MEASURE_USAGE"}
}

test_quasi_identifier_counted_refused if {
	# COUNT(column) is fine of a dimension only.
	"E_MEASURE_USAGE" in codes(variant({"joins": ["patients"], "aggregates": [agg("count", "patients", "postcode")]}))
}

test_filter_not_allowed_refused if {
	action := action_of(object.union(by_specialty, {"joins": ["patients"]}), [use("patients", "year_of_birth", "filter", null)])
	codes(action) == {"E_FILTER_NOT_ALLOWED"}
}

test_generalised_filter_still_needs_filter if {
	action := action_of(object.union(by_specialty, {"joins": ["patients"]}), [use("patients", "postcode", "filter", "postcode_district")])
	codes(action) == {"E_FILTER_NOT_ALLOWED"}
}

# --- Obligations ---------------------------------------------------------------------------------

test_opt_out_applies_to_every_purpose if {
	every purpose in ["planning", "research", "audit", "direct_care"] {
		decide(example_action, object.union(identity, {"purpose": purpose})).obligations.apply_opt_out == true
	}
}

test_opt_out_applies_when_refused if {
	d := decide(example_action, object.union(identity, {"project": "nope"}))
	d.obligations.apply_opt_out == true
}

test_project_trusts_are_an_obligation if {
	d := decide(variant({}), object.union(identity, {"project": "cardiac-audit", "purpose": "research"}))
	d.allow
	d.obligations.trusts == ["RXA", "RXB"]
}

# --- Gateway and nodes ---------------------------------------------------------------------------

# A node decides with origin "gateway": the same rules, the same decision.
test_nodes_decide_as_the_gateway_does if {
	actions := [
		example_action,
		variant({"group_by": [dim("episodes", "cost", null)]}),
		variant({"joins": ["patients"], "group_by": [dim("patients", "postcode", null)]}),
		filtered([use("episodes", "person_id", "filter", null)]),
	]
	every action in actions {
		decide_as(action, identity, "gateway") == decide_as(action, identity, "analyst")
	}
	decide_as(example_action, identity, "gateway").allow
	not decide_as(actions[1], identity, "gateway").allow
}
