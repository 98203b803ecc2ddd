# Tally's default disclosure policy (NHS rules). Governance teams own this file: edit it,
# run `tally policy test policies/`, and the gateway and nodes reload it without a restart.
#
# Input: see policies/README.md. Output: data.tally.decision = {allow, reasons, obligations}.
# Every refusal carries a stable reason code that analysts can look up in policies/README.md.
package tally

import rego.v1

settings := data.governance.settings

identity := object.get(input, ["context", "identity"], {})

action := object.get(input, "action", {})

columns := object.get(action, "columns", [])

aggregates := object.get(action, "aggregates", [])

features := object.get(action, "features", {})

feature(name) if object.get(features, name, false) == true

reason(code, message) := {"code": code, "message": message}

# --- Who may ask, for what ---------------------------------------------------------------

project := data.governance.projects[identity.project]

reasons contains reason("E_PROJECT", msg) if {
	not project
	msg := sprintf("project '%v' is not registered for Tally queries", [object.get(identity, "project", "")])
}

reasons contains reason("E_PURPOSE", msg) if {
	project
	not identity.purpose in project.purposes
	msg := sprintf("purpose '%v' is not approved for project '%v'", [object.get(identity, "purpose", ""), identity.project])
}

reasons contains reason("E_TABLE_NOT_ALLOWED", msg) if {
	project
	some table in object.get(action, "tables", [])
	not table in project.tables
	msg := sprintf("project '%v' has no access to table '%v'", [identity.project, table])
}

# --- Aggregates only ------------------------------------------------------------------------

reasons contains reason("E_NOT_AGGREGATE", "the query must aggregate (COUNT, SUM, AVG, ...): rows never leave a trust") if {
	feature("no_aggregate")
}

reasons contains reason("E_AGG_NOT_ALLOWED", msg) if {
	some agg in aggregates
	not agg.function in settings.allowed_aggregates
	msg := sprintf("aggregate %v is not allowed: it can reveal a single patient's value", [upper(agg.function)])
}

reasons contains reason("E_EXPR_SHAPE", msg) if {
	some agg in aggregates
	not agg.argument_shape in {"star", "column", "arithmetic"}
	msg := sprintf("%v must take a bare column, not a %v", [upper(agg.function), agg.argument_shape])
}

# Arithmetic inside an aggregate (SUM(price * (1 - discount))) only over tables whose catalogue
# entry enables it: products of a row's values can single out rows (a polynomial that is zero
# for every value but one), so no person-level table enables it.
reasons contains reason("E_EXPR_SHAPE", msg) if {
	some agg in aggregates
	agg.argument_shape == "arithmetic"
	some c in columns
	c.usage == "aggregate_arg"
	not object.get(data.governance.catalogue, [c.table, "aggregate_arithmetic"], false) == true
	msg := sprintf("%v must take a bare column: arithmetic inside aggregates is not enabled for table %v", [upper(agg.function), c.table])
}

reasons contains reason("E_EXPR_SHAPE", msg) if {
	some agg in aggregates
	agg.distinct
	msg := sprintf("%v(DISTINCT ...) is not allowed", [upper(agg.function)])
}

reasons contains reason("E_EXPR_SHAPE", msg) if {
	some agg in aggregates
	agg.filter
	msg := sprintf("%v(...) FILTER (WHERE ...) is not allowed", [upper(agg.function)])
}

# --- Column classes -------------------------------------------------------------------------

reasons contains reason("E_UNCLASSIFIED_COLUMN", msg) if {
	some c in columns
	c.class == "unclassified"
	msg := sprintf("column %v.%v has no class in the governance catalogue", [c.table, c.column])
}

# Identifiers: only in joins between a trust's own tables, bare.
reasons contains reason("E_IDENTIFIER_COLUMN", msg) if {
	some c in columns
	c.class == "identifier"
	not bare_join(c)
	msg := sprintf("column %v.%v identifies people: it may only join a trust's own tables", [c.table, c.column])
}

bare_join(c) if {
	c.usage == "join"
	count(c.functions) == 0
}

# Quasi-identifiers: in output and grouping only through a generalising function.
reasons contains reason("E_QUASI_IDENTIFIER", msg) if {
	some c in columns
	c.class == "quasi_identifier"
	c.usage in {"output", "group_by", "aggregate_arg", "join"}
	not generalised(c)
	msg := sprintf("column %v.%v must be generalised (%v) before it is grouped or shown", [c.table, c.column, concat(", ", settings.generalising_functions)])
}

generalised(c) if {
	some f in c.functions
	f in settings.generalising_functions
}

# Measures: only as the bare argument of an aggregate.
reasons contains reason("E_MEASURE_USAGE", msg) if {
	some c in columns
	c.class == "measure"
	c.usage != "aggregate_arg"
	msg := sprintf("measure %v.%v may only be aggregated (SUM, AVG, ...)", [c.table, c.column])
}

reasons contains reason("E_MEASURE_USAGE", msg) if {
	some c in columns
	c.class == "measure"
	c.usage == "aggregate_arg"
	count(c.functions) > 0
	msg := sprintf("measure %v.%v must be aggregated as it is, without functions", [c.table, c.column])
}

# --- Functions and query shape --------------------------------------------------------------

reasons contains reason("E_FUNCTION_NOT_ALLOWED", msg) if {
	some f in object.get(action, "functions", [])
	not f in settings.allowed_functions
	msg := sprintf("function %v is not on the allowed list", [f])
}

shape_rules := {
	"window": ["E_WINDOW", "window functions are not allowed"],
	"set_operation": ["E_SETOP", "UNION, INTERSECT and EXCEPT are not allowed"],
	"values": ["E_VALUES", "VALUES lists are not allowed"],
	"table_function": ["E_TABLE_FUNCTION", "table functions are not allowed"],
	"grouping_sets": ["E_GROUPING_SETS", "ROLLUP, CUBE and GROUPING SETS are not allowed"],
	"limit_below_aggregate": ["E_LIMIT_BELOW_AGGREGATE", "LIMIT below an aggregate is not allowed"],
	"order_below_aggregate": ["E_LIMIT_BELOW_AGGREGATE", "ORDER BY below an aggregate is not allowed"],
	"information_schema": ["E_METADATA", "information_schema is not available"],
}

reasons contains reason(rule[0], rule[1]) if {
	some name, rule in shape_rules
	feature(name)
}

# --- Decision -------------------------------------------------------------------------------

default apply_opt_out := true

apply_opt_out := false if identity.purpose in settings.opt_out_exempt_purposes

default allowed_trusts := []

allowed_trusts := project.trusts

obligations := {
	"min_distinct_patients": settings.min_distinct_patients,
	"round_to": settings.round_to,
	"apply_opt_out": apply_opt_out,
	"trusts": allowed_trusts,
}

decision := {
	"allow": count(reasons) == 0,
	"reasons": [r | some r in reasons],
	"obligations": obligations,
}
