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

allowed_galleries contains g if {
	some grant in grants
	some g in grant.galleries
	cfg.galleries[g]
}

allowed_purposes contains p if {
	some grant in grants
	some p in grant.purposes
}

allowed_modes contains m if {
	some grant in grants
	some m in grant.modes
}

purpose_known if {
	some p in cfg.purposes
	p == input.purpose
}

face_probe if {
	probe_rpc
	input.probe.kind == "face"
}

face_probe if {
	probe_rpc
	cfg.rpcs[rpc].probe_kind == "face"
}

# ---- R1 purpose ----------------------------------------------------------------------

deny contains "R1" if {
	probe_rpc
	not purpose_known
}

deny contains "R1" if {
	present(input.purpose)
	not purpose_known
}

# The caller's roles may not pursue this purpose.
deny contains "R1" if {
	probe_rpc
	purpose_known
	count(grants) > 0
	not input.purpose in allowed_purposes
}

# The purpose does not fit the gallery (purpose limitation).
deny contains "R1" if {
	probe_rpc
	purpose_known
	some g in req_galleries
	gallery := cfg.galleries[g]
	not input.purpose in gallery.purposes
}

# ---- R2 gallery by role ------------------------------------------------------------------

deny contains "R2" if {
	probe_rpc
	count(grants) > 0
	some g in req_galleries
	not g in allowed_galleries
}

# ---- R3 judicial order for 1:N registry searches -----------------------------------------

judicial_galleries contains g if {
	family == "search"
	some g in req_galleries
	cfg.galleries[g].judicial_order_required == true
}

registry_search if count(judicial_galleries) > 0

deny contains "R3" if {
	some g in judicial_galleries
	g in allowed_galleries
	not judicial_order_ok
}

authorisation := authorisations[input.context.authorisation_id]

judicial_order_ok if {
	caller_kind == cfg.judicial.caller_kind
	some role in caller_roles
	role in cfg.judicial.roles
	input.purpose == cfg.judicial.purpose
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
	input.context.site_id in auth.sites
	input.context.offence_category in auth.offences
}

# ---- R4 verification (1:1) ---------------------------------------------------------------

deny contains "R4" if {
	family == "verify"
	purpose_known
	input.purpose != cfg.verification.purpose
}

deny contains "R4" if {
	family == "verify"
	input.mode in {"ALERT", "INVESTIGATION"}
}

deny contains "R4" if {
	family == "verify"
	count(req_galleries) != 1
}

deny contains "R4" if {
	family == "verify"
	some g in req_galleries
	not cfg.galleries[g].verification == true
}

# Verification is never a 1:N search.
deny contains "R4" if {
	family == "search"
	input.purpose == cfg.verification.purpose
}

deny contains "R4" if {
	family == "search"
	input.mode == cfg.verification.mode
}

# ---- R5 jurisdiction ---------------------------------------------------------------------

site_bound if caller_kind in cfg.jurisdiction.site_bound_kinds

own_active_site if {
	site := sites[input.context.site_id]
	site.municipality == input.caller.org
	site.active == true
}

deny contains "R5" if {
	probe_rpc
	site_bound
	not own_active_site
}

deny contains "R5" if {
	family == "alert"
	site_bound
	present(input.context.site_id)
	not own_active_site
}

# ---- R6 active entries only --------------------------------------------------------------

deny contains "R6" if {
	probe_rpc
	input.requested.include_inactive == true
}

# ---- R8 thresholds -----------------------------------------------------------------------

calibrated(gallery) if {
	is_number(gallery.threshold_floor)
	gallery.threshold_floor > 0
	gallery.threshold_floor <= 1
	is_number(gallery.alert_threshold)
	gallery.alert_threshold >= gallery.threshold_floor
	gallery.alert_threshold <= 1
}

deny contains "R8" if {
	probe_rpc
	some g in req_galleries
	gallery := cfg.galleries[g]
	not calibrated(gallery)
}

# A mode without a cap, or a cap above 50 (R8: at most 50 ranked candidates), fails closed.
deny contains "R8" if {
	probe_rpc
	input.mode in {"ALERT", "INVESTIGATION", "VERIFY"}
	not valid_cap(cfg.max_results[input.mode])
}

valid_cap(c) if {
	is_number(c)
	c >= 1
	c <= 50
}

# ---- R10 modes: a ranked candidate list is more than most callers need -------------------

deny contains "R10" if {
	family == "search"
	count(grants) > 0
	input.mode in {"ALERT", "INVESTIGATION"}
	not input.mode in allowed_modes
}

# ---- R11 no probe retention --------------------------------------------------------------

deny contains "R11" if {
	probe_rpc
	input.requested.retain_probe == true
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

deny contains "R13" if {
	probe_rpc
	floor_q := cfg.quality_floor[input.probe.kind]
	input.probe.quality < floor_q
}

deny contains "R13" if {
	probe_rpc
	input.probe.kind in {"face", "plate"}
	not is_number(cfg.quality_floor[input.probe.kind])
}

deny contains "R13" if {
	probe_rpc
	some g in req_galleries
	gallery := cfg.galleries[g]
	gallery.kind != input.probe.kind
}

deny contains "R13" if {
	probe_rpc
	some g in req_galleries
	gallery := cfg.galleries[g]
	gallery.model_id != input.probe.model_id
}
