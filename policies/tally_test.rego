# Tests of the default policy: at least one per rule. Run: tally policy test policies/
package tally_test

import rego.v1

import data.tally

identity := {"user": "analyst", "groups": ["analysts"], "project": "uec-demand", "purpose": "planning"}

count_star := {"function": "count", "argument_shape": "star", "distinct": false, "filter": false}

specialty_group := {"table": "episodes", "column": "specialty", "class": "dimension", "usage": "group_by", "functions": []}

specialty_output := object.union(specialty_group, {"usage": "output"})

# SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty
allowed_action := {
	"operation": "query",
	"tables": ["episodes"],
	"columns": [specialty_group, specialty_output],
	"aggregates": [count_star],
	"functions": [],
	"features": {},
	"trusts": ["RXA", "RXB", "RXC"],
}

decide(action, who) := d if {
	d := tally.decision with input as {"context": {"identity": who}, "action": action}
}

codes(action) := {r.code | some r in decide(action, identity).reasons}

with_columns(extra) := object.union(allowed_action, {"columns": array.concat(allowed_action.columns, extra)})

column(table, name, class, usage, functions) := {"table": table, "column": name, "class": class, "usage": usage, "functions": functions}

test_simple_count_is_allowed if {
	d := decide(allowed_action, identity)
	d.allow
	d.obligations.min_distinct_patients == 8
	d.obligations.round_to == 5
}

test_unknown_project_refused if {
	d := decide(allowed_action, object.union(identity, {"project": "nope"}))
	not d.allow
	"E_PROJECT" in {r.code | some r in d.reasons}
}

test_unapproved_purpose_refused if {
	d := decide(allowed_action, object.union(identity, {"project": "cardiac-audit", "purpose": "planning"}))
	"E_PURPOSE" in {r.code | some r in d.reasons}
}

test_table_outside_project_refused if {
	action := object.union(allowed_action, {"tables": ["patients"]})
	d := decide(action, object.union(identity, {"project": "cardiac-audit", "purpose": "research"}))
	"E_TABLE_NOT_ALLOWED" in {r.code | some r in d.reasons}
}

test_project_trusts_are_an_obligation if {
	d := decide(allowed_action, object.union(identity, {"project": "cardiac-audit", "purpose": "research"}))
	d.obligations.trusts == ["RXA", "RXB"]
}

test_row_level_refused if {
	"E_NOT_AGGREGATE" in codes(object.union(allowed_action, {"features": {"no_aggregate": true}}))
}

test_min_max_refused if {
	action := object.union(allowed_action, {"aggregates": [object.union(count_star, {"function": "max", "argument_shape": "column"})]})
	"E_AGG_NOT_ALLOWED" in codes(action)
}

test_median_refused if {
	action := object.union(allowed_action, {"aggregates": [object.union(count_star, {"function": "median", "argument_shape": "column"})]})
	"E_AGG_NOT_ALLOWED" in codes(action)
}

test_sum_over_case_refused if {
	action := object.union(allowed_action, {"aggregates": [object.union(count_star, {"function": "sum", "argument_shape": "case"})]})
	"E_EXPR_SHAPE" in codes(action)
}

# SUM(cost * length_of_stay): arithmetic over a person-level table.
arithmetic_action := object.union(allowed_action, {
	"aggregates": [object.union(count_star, {"function": "sum", "argument_shape": "arithmetic"})],
	"columns": [
		specialty_group,
		specialty_output,
		{"table": "episodes", "column": "cost", "class": "measure", "usage": "aggregate_arg", "functions": []},
		{"table": "episodes", "column": "length_of_stay", "class": "measure", "usage": "aggregate_arg", "functions": []},
	],
})

test_arithmetic_in_aggregate_refused_by_default if {
	"E_EXPR_SHAPE" in codes(arithmetic_action)
}

test_arithmetic_in_aggregate_allowed_where_the_table_enables_it if {
	catalogue := object.union(data.governance.catalogue, {"episodes": object.union(data.governance.catalogue.episodes, {"aggregate_arithmetic": true})})
	d := tally.decision with input as {"context": {"identity": identity}, "action": arithmetic_action}
		with data.governance.catalogue as catalogue
	d.allow
}

test_arithmetic_needs_every_table_to_enable_it if {
	catalogue := object.union(data.governance.catalogue, {"episodes": object.union(data.governance.catalogue.episodes, {"aggregate_arithmetic": true})})
	action := object.union(arithmetic_action, {"columns": array.concat(arithmetic_action.columns, [{"table": "patients", "column": "imd_decile", "class": "dimension", "usage": "aggregate_arg", "functions": []}])})
	d := tally.decision with input as {"context": {"identity": identity}, "action": action}
		with data.governance.catalogue as catalogue
	"E_EXPR_SHAPE" in {r.code | some r in d.reasons}
}

test_distinct_aggregate_refused if {
	"E_EXPR_SHAPE" in codes(object.union(allowed_action, {"aggregates": [object.union(count_star, {"distinct": true})]}))
}

test_filter_clause_refused if {
	"E_EXPR_SHAPE" in codes(object.union(allowed_action, {"aggregates": [object.union(count_star, {"filter": true})]}))
}

test_unclassified_column_refused if {
	"E_UNCLASSIFIED_COLUMN" in codes(with_columns([column("episodes", "secret", "unclassified", "group_by", [])]))
}

test_identifier_in_output_refused if {
	"E_IDENTIFIER_COLUMN" in codes(with_columns([column("patients", "nhs_number", "identifier", "output", [])]))
}

test_identifier_in_filter_refused if {
	"E_IDENTIFIER_COLUMN" in codes(with_columns([column("patients", "nhs_number", "identifier", "filter", [])]))
}

test_identifier_through_function_refused if {
	"E_IDENTIFIER_COLUMN" in codes(with_columns([column("patients", "nhs_number", "identifier", "join", ["substr"])]))
}

test_identifier_bare_join_allowed if {
	decide(with_columns([column("patients", "person_id", "identifier", "join", [])]), identity).allow
}

test_raw_quasi_identifier_group_refused if {
	"E_QUASI_IDENTIFIER" in codes(with_columns([column("patients", "postcode", "quasi_identifier", "group_by", [])]))
}

test_generalised_quasi_identifier_allowed if {
	decide(with_columns([column("episodes", "age_at_admission", "quasi_identifier", "group_by", ["age_band"])]), identity).allow
}

test_quasi_identifier_filter_allowed if {
	decide(with_columns([column("episodes", "admission_date", "quasi_identifier", "filter", [])]), identity).allow
}

test_measure_grouped_refused if {
	"E_MEASURE_USAGE" in codes(with_columns([column("episodes", "cost", "measure", "group_by", [])]))
}

test_measure_inside_function_refused if {
	"E_MEASURE_USAGE" in codes(with_columns([column("episodes", "cost", "measure", "aggregate_arg", ["round"])]))
}

test_measure_aggregated_allowed if {
	decide(with_columns([column("episodes", "cost", "measure", "aggregate_arg", [])]), identity).allow
}

test_unknown_function_refused if {
	"E_FUNCTION_NOT_ALLOWED" in codes(object.union(allowed_action, {"functions": ["md5"]}))
}

test_window_refused if {
	"E_WINDOW" in codes(object.union(allowed_action, {"features": {"window": true}}))
}

test_set_operation_refused if {
	"E_SETOP" in codes(object.union(allowed_action, {"features": {"set_operation": true}}))
}

test_values_refused if {
	"E_VALUES" in codes(object.union(allowed_action, {"features": {"values": true}}))
}

test_table_function_refused if {
	"E_TABLE_FUNCTION" in codes(object.union(allowed_action, {"features": {"table_function": true}}))
}

test_rollup_refused if {
	"E_GROUPING_SETS" in codes(object.union(allowed_action, {"features": {"grouping_sets": true}}))
}

test_limit_below_aggregate_refused if {
	"E_LIMIT_BELOW_AGGREGATE" in codes(object.union(allowed_action, {"features": {"limit_below_aggregate": true}}))
}

test_order_below_aggregate_refused if {
	"E_LIMIT_BELOW_AGGREGATE" in codes(object.union(allowed_action, {"features": {"order_below_aggregate": true}}))
}

test_information_schema_refused if {
	"E_METADATA" in codes(object.union(allowed_action, {"features": {"information_schema": true}}))
}

test_opt_out_applies_to_research if {
	decide(allowed_action, object.union(identity, {"purpose": "research"})).obligations.apply_opt_out
}

test_opt_out_applies_without_purpose if {
	who := {"user": "analyst", "groups": [], "project": "uec-demand"}
	decide(allowed_action, who).obligations.apply_opt_out
}

test_opt_out_exempts_direct_care if {
	not decide(allowed_action, object.union(identity, {"purpose": "direct_care"})).obligations.apply_opt_out
}
