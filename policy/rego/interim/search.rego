# Searches and verification: MatchFace, MatchPlate, StreamMatch (per probe), VerifyFace.
#
# Rules: R1 purpose, R2 gallery-by-role, R3 judicial order, R4 verification, R5 jurisdiction,
# R6 active entries only, R8 thresholds, R10 minimal response (modes), R11 no probe retention,
# R12 kill switch, R13 quality and model.
#
# Invariants:
#   * Every requested gallery must pass every check; there is no partial allow.
#   * A gallery without a calibrated floor, or whose policy threshold is below its floor,
#     cannot be searched (R8 fails closed on a bad data.json edit).
package centinela

# The requested galleries' entries in data.json, looked up once.
gallery_specs := {g: spec |
	some g in req_galleries
	spec := cfg.galleries[g]
}

allowed_galleries contains g if {
	some grant in grants
	some g in grant.galleries
}

allowed_purposes contains p if {
	some grant in grants
	some p in grant.purposes
}

allowed_modes contains m if {
	some grant in grants
	some m in grant.modes
}

purpose_known if in_purpose in cfg.purposes

face_probe if {
	probe_rpc
	probe_kind == "face"
}

face_probe if {
	probe_rpc
	rpc_probe_kind == "face"
}

# ---- R1 purpose ----------------------------------------------------------------------

deny contains "R1" if {
	probe_rpc
	not purpose_known
}

deny contains "R1" if {
	in_purpose != null
	not purpose_known
}

# The caller's roles may not pursue this purpose.
deny contains "R1" if {
	probe_rpc
	purpose_known
	granted
	not in_purpose in allowed_purposes
}

# The purpose does not fit the gallery (purpose limitation).
deny contains "R1" if {
	probe_rpc
	purpose_known
	some spec in gallery_specs
	not in_purpose in spec.purposes
}

# ---- R2 gallery by role ------------------------------------------------------------------

deny contains "R2" if {
	probe_rpc
	granted
	some g in req_galleries
	not gallery_open(g)
}

gallery_open(g) if {
	g in allowed_galleries
	gallery_specs[g]
}

# ---- R3 judicial order for 1:N registry searches -----------------------------------------

judicial_galleries contains g if {
	family == "search"
	some g, spec in gallery_specs
	spec.judicial_order_required == true
}

registry_search if count(judicial_galleries) > 0

deny contains "R3" if {
	some g in judicial_galleries
	g in allowed_galleries
	not judicial_order_ok
}

authorisation := authorisations[ctx_authorisation_id]

authorisation_reads contains ctx_authorisation_id if is_string(ctx_authorisation_id)

judicial_order_ok if {
	caller_kind == cfg.judicial.caller_kind
	some role in caller_role_list
	role in cfg.judicial.roles
	in_purpose == cfg.judicial.purpose
	authorisation_covers
}

authorisation_covers if {
	auth := authorisation
	not auth.revoked == true
	non_empty_string(auth.court)
	not_before := ts_ns(auth.not_before)
	not_after := ts_ns(auth.not_after)
	not_before <= now_ns
	now_ns <= not_after
	not_before <= capture_ns
	capture_ns <= not_after
	ctx_site_id in auth.sites
	ctx_offence in auth.offences
}

# authorisation_covers compares both times with the authorisation's window.
now_instants contains t if some t in authorisation_window

capture_instants contains t if some t in authorisation_window

authorisation_window contains ts_ns(authorisation.not_before)

authorisation_window contains ts_ns(authorisation.not_after)

# ---- R4 verification (1:1) ---------------------------------------------------------------

deny contains "R4" if {
	family == "verify"
	not verification_shape
}

verification_shape if {
	in_purpose == cfg.verification.purpose
	in_mode == cfg.verification.mode
	count(req_galleries) == 1
	every spec in gallery_specs {
		spec.verification == true
	}
	count(gallery_specs) == 1
}

# Verification is never a 1:N search.
deny contains "R4" if {
	family == "search"
	in_purpose == cfg.verification.purpose
}

deny contains "R4" if {
	family == "search"
	in_mode == cfg.verification.mode
}

# ---- R5 jurisdiction ---------------------------------------------------------------------
# Probes only. Alerts are scoped by `alert_scope` (R10): the server answers an alert outside
# the caller's jurisdiction as not found, without saying whose it is.

site_bound if caller_kind in cfg.jurisdiction.site_bound_kinds

own_active_site if {
	site := sites[ctx_site_id]
	site.municipality == caller_org
	site.active == true
}

site_reads contains ctx_site_id if is_string(ctx_site_id)

deny contains "R5" if {
	probe_rpc
	site_bound
	not own_active_site
}

# ---- R6 active entries only --------------------------------------------------------------

deny contains "R6" if {
	probe_rpc
	req_include_inactive == true
}

# ---- R8 thresholds -----------------------------------------------------------------------

calibrated(spec) if {
	is_number(spec.threshold_floor)
	spec.threshold_floor > 0
	spec.threshold_floor <= 1
	is_number(spec.alert_threshold)
	spec.alert_threshold >= spec.threshold_floor
	spec.alert_threshold <= 1
}

deny contains "R8" if {
	probe_rpc
	some spec in gallery_specs
	not calibrated(spec)
}

# A mode without a cap, or a cap above 50 (R8: at most 50 ranked candidates), fails closed.
deny contains "R8" if {
	probe_rpc
	in_mode in probe_modes
	not valid_cap(mode_cap_raw)
}

valid_cap(c) if {
	is_number(c)
	c >= 1
	c <= 50
}

# ---- R10 modes: a ranked candidate list is more than most callers need -------------------

deny contains "R10" if {
	family == "search"
	granted
	in_mode in {"ALERT", "INVESTIGATION"}
	not in_mode in allowed_modes
}

# ---- R11 no probe retention --------------------------------------------------------------

deny contains "R11" if {
	probe_rpc
	req_retain_probe == true
}

deny contains "R11" if {
	probe_rpc
	not cfg.probe_retention.non_hit_days == 0
}

# ---- R12 kill switch ---------------------------------------------------------------------

facial_matching_enabled if {
	cfg.framework.facial_matching_enabled == true
	non_empty_string(cfg.framework.impact_assessment_id)
}

deny contains "R12" if {
	face_probe
	not facial_matching_enabled
}

# ---- R13 quality and model ---------------------------------------------------------------

quality_floor := cfg.quality_floor[probe_kind]

deny contains "R13" if {
	probe_rpc
	probe_quality < quality_floor
}

quality_instants contains quality_floor if is_number(quality_floor)

deny contains "R13" if {
	probe_rpc
	probe_kind in probe_kinds
	not is_number(quality_floor)
}

deny contains "R13" if {
	probe_rpc
	some spec in gallery_specs
	spec.kind != probe_kind
}

# The model a gallery holds: what the server reports in data.dynamic.models (the matcher
# knows), else the model data.json's floors were calibrated for. "" means no model binding
# (plate lists hold normalised text, not embeddings).
dynamic_models := data.dynamic.models if {
	is_object(data.dynamic.models)
} else := {}

gallery_model(g, spec) := m if {
	m := dynamic_models[g]
	is_string(m)
} else := spec.model_id

# gallery_model is asked for every gallery of the request.
model_reads contains g if some g, _ in gallery_specs

deny contains "R13" if {
	probe_rpc
	some g, spec in gallery_specs
	model := gallery_model(g, spec)
	model != ""
	model != probe_model
}
