# Obligations: what the server must do with an allowed request (and safe values on a deny).
#
# Invariants:
#   * min_score per gallery >= the gallery's calibrated floor (R8: raise, never lower).
#   * max_results <= the mode's cap <= 50 (R8), and <= what the caller asked for.
#   * active_only is always true (R6); human_review is true for every face search and every
#     investigation list (R9); visible_fields come from data per caller kind and mode (R10).
#   * On a deny nothing is searchable: no galleries, no results, no visible fields.
package centinela

known_modes := {"ALERT", "INVESTIGATION", "VERIFY", "ADMIN", "READ"}

mode := in_mode if {
	probe_rpc
	in_mode in known_modes
} else := m if {
	not probe_rpc
	m := rpc_spec.mode
} else := "ADMIN" if {
	admin_write
} else := "READ"

requested_min_score := req_min_score if {
	is_number(req_min_score)
} else := 0

# The threshold a gallery applies in this mode: the policy's alert threshold in ALERT mode,
# the calibrated floor otherwise; the caller may raise it, never lower it.
# (Explicit comparisons, not max()/min(): rego-cpp 1.5.2 orders numbers in those builtins
# as text, e.g. min({5, 10}) == 10; see tests/policy/test_engine_quirks.py.)
gallery_threshold(gallery) := greater(greater(gallery.threshold_floor, gallery.alert_threshold), requested_min_score) if {
	mode == "ALERT"
} else := greater(gallery.threshold_floor, requested_min_score)

greater(a, b) := a if {
	a >= b
} else := b

lesser(a, b) := a if {
	a <= b
} else := b

min_score := {g: s |
	some g, spec in gallery_specs
	s := gallery_threshold(spec)
}

mode_cap_raw := cfg.max_results[mode]

mode_cap := mode_cap_raw if {
	valid_cap(mode_cap_raw)
} else := 1

max_results := lesser(mode_cap, req_max_results) if {
	probe_rpc
	is_number(req_max_results)
} else := mode_cap

visible_fields := fields if {
	fields := cfg.visible_fields[caller_kind][mode]
	is_array(fields)
} else := []

default human_review := false

human_review if face_probe

human_review if {
	family == "search"
	mode == "INVESTIGATION"
}

human_review if rpc == "ConfirmAlert"

allowed_obligations := {
	"galleries": sort([g | some g in req_galleries]),
	"min_score": min_score,
	"max_results": max_results,
	"mode": mode,
	"visible_fields": visible_fields,
	"human_review": human_review,
	"two_person_confirmation": two_person_confirmation,
	"rate_ceiling": rate_ceiling,
	"active_only": true,
	"exclude_objectors": exclude_objectors,
	"objection_exempt_subjects": objection_exempt_subjects,
	"alert_scope": alert_scope,
	"retain_non_hit_probe": false,
}

denied_obligations := {
	"galleries": [],
	"min_score": {},
	"max_results": 0,
	"mode": mode,
	"visible_fields": [],
	"human_review": true,
	"two_person_confirmation": two_person_in_force,
	"rate_ceiling": rate_ceiling,
	"active_only": true,
	"exclude_objectors": objections_in_force,
	"objection_exempt_subjects": [],
	"alert_scope": null,
	"retain_non_hit_probe": false,
}

obligations := allowed_obligations if allow else := denied_obligations
