# Tally's default disclosure policy (NHS rules). Governance teams own this file: edit it,
# run `tally policy test policies/`, and the gateway and nodes reload it without a restart.
#
# It decides over the query model: one release (a fact table, declared joins, a filter,
# group-by dimensions and aggregates), with every column use flattened into action.columns.
# The gateway and every node evaluate this same policy over the same model.
#
# Input: see policies/README.md. Output: data.tally.decision = {allow, reasons, obligations}.
# Every refusal carries a stable reason code that analysts can look up in policies/README.md.
package tally

import rego.v1

settings := data.governance.settings

catalogue := data.governance.catalogue

identity := object.get(input, ["context", "identity"], {})

purpose := object.get(identity, "purpose", "")

action := object.get(input, "action", {})

release := object.get(action, "release", {})

columns := object.get(action, "columns", [])

reason(code, message) := {"code": code, "message": message}

# The catalogue entry of a column use or column reference ({} when the catalogue lacks it).
spec(c) := object.get(catalogue, [c.table, "columns", c.column], {})

class_of(c) := object.get(spec(c), "class", "unclassified")

generaliser(c) := object.get(c, "generaliser", null)

# The SQL an analyst writes for each aggregate of the model.
sql_names := {
	"count_rows": "COUNT(*)",
	"count": "COUNT",
	"sum": "SUM",
	"mean": "AVG",
	"variance": "VAR",
	"std_dev": "STDDEV",
}

allowed_aggregates := object.keys(sql_names)

# The aggregate functions the action lists, and those of the release itself.
aggregate_functions := {f | some f in object.get(action, "aggregates", [])} | {a.function | some a in object.get(release, "aggregates", [])}

# --- Who may ask, for what -------------------------------------------------------------------

project := data.governance.projects[identity.project]

reasons contains reason("E_PROJECT", msg) if {
	not project
	msg := sprintf("project '%v' is not registered for Tally queries", [object.get(identity, "project", "")])
}

# Direct care (the care of one patient) is never an analytics purpose, whatever a project lists.
reasons contains reason("E_PURPOSE", msg) if {
	not purpose in settings.analytics_purposes
	msg := sprintf("purpose '%v' is not an analytics purpose (%v)", [purpose, concat(", ", settings.analytics_purposes)])
}

reasons contains reason("E_PURPOSE", msg) if {
	project
	purpose in settings.analytics_purposes
	not purpose in project.purposes
	msg := sprintf("purpose '%v' is not approved for project '%v'", [purpose, identity.project])
}

reasons contains reason("E_TABLE_NOT_ALLOWED", msg) if {
	project
	some table in object.get(action, "tables", [])
	not table in project.tables
	msg := sprintf("project '%v' has no access to table '%v'", [identity.project, table])
}

# --- Query shape --------------------------------------------------------------------------------

reasons contains reason("E_QUERY_SHAPE", "the policy decides releases of the query model only") if {
	not action.kind == "release"
}

reasons contains reason("E_QUERY_SHAPE", msg) if {
	object.get(catalogue, [release.fact, "privacy_unit"], null) == null
	msg := sprintf("table '%v' has no privacy unit: only tables of patients' rows can be aggregated over", [release.fact])
}

reasons contains reason("E_QUERY_SHAPE", msg) if {
	some join in object.get(release, "joins", [])
	object.get(catalogue, [release.fact, "relationships", join], null) == null
	msg := sprintf("'%v' may not be joined to '%v': the catalogue declares no such relationship", [release.fact, join])
}

reasons contains reason("E_AGG_NOT_ALLOWED", msg) if {
	some f in aggregate_functions
	not f in allowed_aggregates
	msg := sprintf("aggregate '%v' is not allowed: only COUNT, SUM, AVG, VAR and STDDEV are released", [f])
}

# --- Column classes -----------------------------------------------------------------------------

reasons contains reason("E_IDENTIFIER_COLUMN", msg) if {
	some c in columns
	c.class == "identifier"
	msg := sprintf("column %v.%v identifies people or records: it may not be used in a query", [c.table, c.column])
}

reasons contains reason("E_UNCLASSIFIED_COLUMN", msg) if {
	some c in columns
	c.class == "unclassified"
	msg := sprintf("column %v.%v has no class in the governance catalogue", [c.table, c.column])
}

# Quasi-identifiers are grouped only through a generaliser their catalogue entry declares.
reasons contains reason("E_QUASI_IDENTIFIER", msg) if {
	some c in columns
	c.class == "quasi_identifier"
	c.usage == "group_by"
	generaliser(c) == null
	msg := sprintf("column %v.%v is a quasi-identifier: group by a generalisation of it (%v)", [c.table, c.column, declared(c)])
}

# No column, of any class, takes a generaliser its catalogue entry does not declare.
reasons contains reason("E_QUASI_IDENTIFIER", msg) if {
	some c in columns
	generaliser(c) != null
	not generaliser(c) in object.get(spec(c), "generalisers", [])
	msg := sprintf("%v is not a declared generaliser of %v.%v (%v)", [c.generaliser, c.table, c.column, declared(c)])
}

declared(c) := sprintf("declared: %v", [concat(", ", spec(c).generalisers)]) if {
	count(object.get(spec(c), "generalisers", [])) > 0
} else := "it has no declared generaliser"

reasons contains reason("E_MEASURE_USAGE", msg) if {
	some c in columns
	c.class == "measure"
	c.usage == "group_by"
	msg := sprintf("measure %v.%v may not be grouped: aggregate it, or filter on it", [c.table, c.column])
}

# SUM, AVG, VAR and STDDEV take measures, or columns the catalogue marks "aggregate": true;
# COUNT(column) of a dimension is fine. Identifiers and unclassified columns are refused above.
reasons contains reason("E_MEASURE_USAGE", msg) if {
	some agg in object.get(release, "aggregates", [])
	class_of(agg.column) in {"dimension", "quasi_identifier"}
	not object.get(spec(agg.column), "aggregate", false) == true
	not counted_dimension(agg)
	msg := sprintf("%v(%v.%v) is not allowed: the column is a %v the catalogue does not let you aggregate", [object.get(sql_names, agg.function, agg.function), agg.column.table, agg.column.column, class_of(agg.column)])
}

counted_dimension(agg) if {
	agg.function == "count"
	class_of(agg.column) == "dimension"
}

reasons contains reason("E_FILTER_NOT_ALLOWED", msg) if {
	some c in columns
	c.usage == "filter"
	not c.class in {"identifier", "unclassified"}
	not object.get(spec(c), "filter", false) == true
	msg := sprintf("column %v.%v may not be filtered on", [c.table, c.column])
}

# --- Decision -----------------------------------------------------------------------------------

# The National Data Opt-out applies to all analytics: no purpose is exempt.
apply_opt_out := true

default allowed_trusts := []

allowed_trusts := project.trusts

# --- Privacy budget (zCDP ρ, kept per project and dataset at the gateway and every trust) ---

# A project's own budget, where the catalogue gives one; else the settings' defaults.
project_budget := object.get(data.governance.projects, [object.get(identity, "project", ""), "budget"], {})

rho_per_release := object.get(project_budget, "rho_per_release", settings.privacy.rho_per_release)

rho_cap := object.get(project_budget, "rho_cap", settings.privacy.rho_cap)

spent := object.get(input, ["context", "budget", "spent"], 0)

# A release the project already paid for returns its stored noisy answer, free.
repeat := object.get(input, ["context", "budget", "repeat"], false)

# No noise, no budget: the exact mode of tests that compare with a central computation.
charged if settings.privacy.noise != "off"

reasons contains reason("E_BUDGET_EXHAUSTED", msg) if {
	charged
	not repeat
	spent + rho_per_release > rho_cap
	msg := sprintf(
		"project '%v' has spent ρ = %v of its %v on dataset '%v'; a release costs %v",
		[identity.project, spent, rho_cap, settings.privacy.dataset, rho_per_release],
	)
}

budget := {
	"dataset": settings.privacy.dataset,
	"rho_per_release": rho_per_release,
	"rho_cap": rho_cap,
}

obligations := {
	"apply_opt_out": apply_opt_out,
	"trusts": allowed_trusts,
	"budget": budget,
}

decision := {
	"allow": count(reasons) == 0,
	"reasons": [r | some r in reasons],
	"obligations": obligations,
}
