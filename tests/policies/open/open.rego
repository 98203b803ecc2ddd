# A policy that allows every query the code's floor allows, with no disclosure control and
# no opt-out: the configuration in which the gateway's answers must equal a central
# DataFusion's answers exactly. For tests only.
package tally

import rego.v1

decision := {
	"allow": true,
	"reasons": [],
	"obligations": {
		"apply_opt_out": false,
		"budget": {"dataset": "hes", "rho_per_release": 0, "rho_cap": 1000000},
	},
}
