# The one entry point of the policy: data.centinela.decision.
#
# Invariants (LEGAL_RULES.md, DESIGN.md §5):
#   * Default deny: `allow` is true only for a well-formed input, a known RPC, a caller whose
#     roles grant that RPC, and no rule in `deny` firing.
#   * The decision is defined for every input, garbage included, once the server's data are
#     loaded (`data.centinela_config` and `data.dynamic`), so an engine never has to guess:
#     an undefined decision is an engine failure and reads as a deny there. Without that
#     data it is undefined: an OPA sidecar that restarted has lost what the server pushed,
#     and the server publishes it again (policy/opa.py) instead of deciding without it.
#   * `reasons` holds the rule ids that denied (or INPUT_MALFORMED / DEFAULT_DENY); on an
#     allow it holds the rule ids whose obligations shape the answer.
#   * Obligations can only narrow: galleries are the requested ones, thresholds are never
#     below the calibrated floor (R8), results are capped by mode.
#   * `instants` names every value at which the decision may change with the request's times
#     and probe quality (request.rego): the server reuses the decision between them.
#   * `reads` names every entry of data.dynamic the decision looked up (request.rego): the
#     server keeps the decision while other entries change.
#
# Rego v1. Modules in this bundle share package `centinela`; tests live in `centinela_test`.
package centinela

decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
	"details": details,
	"instants": instants,
	"reads": reads,
} if {
	loaded
}

# What the server pushes to an OPA sidecar (the embedded engine always has both).
loaded if {
	is_object(data.centinela_config)
	is_object(data.dynamic.sites)
	is_object(data.dynamic.authorisations)
}

default allow := false

allow if {
	count(malformed) == 0
	count(deny) == 0
	rpc_known
	count(grants) > 0
}

reasons := ["INPUT_MALFORMED"] if {
	count(malformed) > 0
} else := sort([r | some r in deny]) if {
	count(deny) > 0
} else := ["DEFAULT_DENY"] if {
	not allow
} else := sort([r | some r in constraints])

# Names of malformed input fields (never their values: they may hold personal data).
details := sort([d | some d in malformed])

# Rules whose obligations constrain an allowed answer.
constraints contains "R3" if registry_search

constraints contains "R4" if family == "verify"

constraints contains "R6" if probe_rpc

constraints contains "R7" if exclude_objectors

constraints contains "R8" if probe_rpc

constraints contains "R8" if family == "calibrate"

constraints contains "R9" if human_review

constraints contains "R10" if {
	family in {"search", "verify", "alert"}
}

constraints contains "R15" if family == "admin"

constraints contains "R16" if family == "audit"
