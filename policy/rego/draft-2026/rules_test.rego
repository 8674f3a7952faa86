# One allow-side and one deny-side test (at least) per rule that applies to this bundle.
# Names: test_r<N>_allow_* / test_r<N>_deny_*; tests/policy/test_rego_suites.py checks that
# every rule listed in data.json's bundle.rules has both, and that every test has its case.
package centinela_test

# ---- R1 purpose ----------------------------------------------------------------------

cases.r1_allow_declared_purpose := {"input": muni_face, "expect": expect_allow}

test_r1_allow_declared_purpose if check("r1_allow_declared_purpose")

cases.r1_deny_missing_purpose := {"input": object.remove(muni_face, ["purpose"]), "expect": expect_deny("R1")}

test_r1_deny_missing_purpose if check("r1_deny_missing_purpose")

cases.r1_deny_unknown_purpose := {"input": object.union(muni_face, {"purpose": "CURIOSITY"}), "expect": expect_deny("R1")}

test_r1_deny_unknown_purpose if check("r1_deny_unknown_purpose")

cases.r1_deny_purpose_not_fitting_gallery := {
	"input": object.union(muni_plate, {"purpose": "WANTED_PERSON"}),
	"expect": expect_deny("R1"),
}

test_r1_deny_purpose_not_fitting_gallery if check("r1_deny_purpose_not_fitting_gallery")

cases.r1_deny_municipality_judicial_purpose := {
	"input": object.union(muni_face, {"purpose": "JUDICIAL_INVESTIGATION"}),
	"expect": expect_deny("R1"),
}

test_r1_deny_municipality_judicial_purpose if check("r1_deny_municipality_judicial_purpose")

# ---- R2 gallery by role --------------------------------------------------------------

cases.r2_allow_municipality_plates := {"input": muni_plate, "expect": expect_allow}

test_r2_allow_municipality_plates if check("r2_allow_municipality_plates")

cases.r2_deny_municipality_cannot_search_registry := {
	"input": object.union(muni_face, {"galleries": ["reniec_registry"]}),
	"expect": {"allow": false, "reasons_include": ["R2"], "reasons_exclude": ["R3"]},
}

test_r2_deny_municipality_cannot_search_registry if check("r2_deny_municipality_cannot_search_registry")

cases.r2_deny_unknown_gallery := {"input": object.union(muni_face, {"galleries": ["dni_photos"]}), "expect": expect_deny("R2")}

test_r2_deny_unknown_gallery if check("r2_deny_unknown_gallery")

cases.r2_deny_compliance_cannot_match := {
	"input": patch(muni_face, "caller", {"org": "defensoria", "kind": "compliance", "roles": ["officer"]}),
	"expect": expect_deny("R2"),
}

test_r2_deny_compliance_cannot_match if check("r2_deny_compliance_cannot_match")

# ---- R3 judicial order -----------------------------------------------------------------

cases.r3_allow_investigator_with_authorisation := {
	"input": investigator_registry,
	"expect": {"allow": true, "reasons_include": ["R3", "R9"], "obligations": {"galleries": ["reniec_registry"], "human_review": true}},
}

test_r3_allow_investigator_with_authorisation if check("r3_allow_investigator_with_authorisation")

cases.r3_deny_unknown_authorisation := {
	"input": patch(investigator_registry, "context", {"authorisation_id": "AUT-UNKNOWN"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_unknown_authorisation if check("r3_deny_unknown_authorisation")

cases.r3_deny_expired_authorisation := {
	"input": patch(investigator_registry, "context", {"authorisation_id": "AUT-2026-0002"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_expired_authorisation if check("r3_deny_expired_authorisation")

cases.r3_deny_revoked_authorisation := {
	"input": patch(investigator_registry, "context", {"authorisation_id": "AUT-2026-0003"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_revoked_authorisation if check("r3_deny_revoked_authorisation")

cases.r3_deny_site_outside_scope := {
	"input": patch(investigator_registry, "context", {"site_id": "surco-cam-001"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_site_outside_scope if check("r3_deny_site_outside_scope")

cases.r3_deny_offence_outside_scope := {
	"input": patch(investigator_registry, "context", {"offence_category": "HURTO"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_offence_outside_scope if check("r3_deny_offence_outside_scope")

cases.r3_deny_capture_before_window := {
	"input": patch(investigator_registry, "context", {"capture_time": "2026-01-20T10:00:00Z"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_capture_before_window if check("r3_deny_capture_before_window")

cases.r3_deny_officer_not_investigator := {
	"input": object.union(patch(investigator_registry, "caller", {"roles": ["officer"]}), {"mode": "ALERT"}),
	"expect": expect_deny("R3"),
}

test_r3_deny_officer_not_investigator if check("r3_deny_officer_not_investigator")

# ---- R4 verification ---------------------------------------------------------------------

cases.r4_allow_officer_verifies := {
	"input": officer_verify,
	"expect": {
		"allow": true, "reasons_include": ["R4"],
		"obligations": {"max_results": 1, "mode": "VERIFY", "exclude_objectors": false},
		"visible_fields_exclude": ["candidates", "photo", "name", "dni", "subject_ref"],
	},
}

test_r4_allow_officer_verifies if check("r4_allow_officer_verifies")

cases.r4_deny_municipality_verifies := {
	"input": patch(officer_verify, "caller", {"org": "muni-miraflores", "kind": "municipality", "roles": ["operator"]}),
	"expect": expect_deny("R4"),
}

test_r4_deny_municipality_verifies if check("r4_deny_municipality_verifies")

cases.r4_deny_verification_purpose_on_search := {
	"input": object.union(muni_face, {"purpose": "IDENTITY_VERIFICATION"}),
	"expect": expect_deny("R4"),
}

test_r4_deny_verification_purpose_on_search if check("r4_deny_verification_purpose_on_search")

cases.r4_deny_verify_against_watchlist := {
	"input": object.union(officer_verify, {"galleries": ["pnp_watchlist"]}),
	"expect": expect_deny("R4"),
}

test_r4_deny_verify_against_watchlist if check("r4_deny_verify_against_watchlist")

cases.r4_deny_verify_in_investigation_mode := {
	"input": object.union(officer_verify, {"mode": "INVESTIGATION"}),
	"expect": expect_deny("R4"),
}

test_r4_deny_verify_in_investigation_mode if check("r4_deny_verify_in_investigation_mode")

cases.r4_allow_verification_without_site := {
	"input": object.union(officer_verify, {"context": {"now": "2026-03-01T10:00:02Z", "site_id": ""}}),
	"expect": expect_allow,
}

test_r4_allow_verification_without_site if check("r4_allow_verification_without_site")

# ---- R5 jurisdiction ---------------------------------------------------------------------

cases.r5_allow_own_site := {"input": muni_face, "expect": expect_allow}

test_r5_allow_own_site if check("r5_allow_own_site")

cases.r5_deny_other_municipality_site := {
	"input": patch(muni_face, "context", {"site_id": "surco-cam-001"}),
	"expect": {"allow": false, "reasons": ["R5"]},
}

test_r5_deny_other_municipality_site if check("r5_deny_other_municipality_site")

cases.r5_deny_unregistered_site := {
	"input": patch(muni_face, "context", {"site_id": "mira-cam-404"}),
	"expect": expect_deny("R5"),
}

test_r5_deny_unregistered_site if check("r5_deny_unregistered_site")

cases.r5_deny_deactivated_site := {
	"input": patch(muni_face, "context", {"site_id": "mira-cam-009"}),
	"expect": expect_deny("R5"),
}

test_r5_deny_deactivated_site if check("r5_deny_deactivated_site")

# ---- R6 active entries only --------------------------------------------------------------

cases.r6_allow_active_only_obligation := {
	"input": muni_plate,
	"expect": {"allow": true, "reasons_include": ["R6"], "obligations": {"active_only": true}},
}

test_r6_allow_active_only_obligation if check("r6_allow_active_only_obligation")

cases.r6_deny_request_for_inactive_entries := {
	"input": patch(muni_face, "requested", {"include_inactive": true}),
	"expect": expect_deny("R6"),
}

test_r6_deny_request_for_inactive_entries if check("r6_deny_request_for_inactive_entries")

# ---- R8 thresholds -----------------------------------------------------------------------

cases.r8_allow_threshold_raised_to_floor := {
	"input": patch(muni_face, "requested", {"min_score": 0.1}),
	"expect": {"allow": true, "min_score_at_least": {"pnp_watchlist": data.centinela_config.galleries.pnp_watchlist.threshold_floor}},
}

test_r8_allow_threshold_raised_to_floor if check("r8_allow_threshold_raised_to_floor")

cases.r8_allow_caller_may_raise_threshold := {
	"input": patch(muni_face, "requested", {"min_score": 0.8}),
	"expect": {"allow": true, "obligations": {"min_score": {"pnp_watchlist": 0.8}}},
}

test_r8_allow_caller_may_raise_threshold if check("r8_allow_caller_may_raise_threshold")

cases.r8_allow_investigation_capped_at_50 := {
	"input": patch(investigator_registry, "requested", {"max_results": 500}),
	"expect": {"allow": true, "obligations": {"max_results": 50}},
}

test_r8_allow_investigation_capped_at_50 if check("r8_allow_investigation_capped_at_50")

cases.r8_allow_alert_results_capped := {
	"input": patch(muni_face, "requested", {"max_results": 40}),
	"expect": {"allow": true, "obligations": {"max_results": data.centinela_config.max_results.ALERT}},
}

test_r8_allow_alert_results_capped if check("r8_allow_alert_results_capped")

cases.r8_deny_policy_threshold_below_floor := {
	"input": muni_face,
	"config": {"galleries": {"pnp_watchlist": {"alert_threshold": 0.2}}},
	"expect": expect_deny("R8"),
}

test_r8_deny_policy_threshold_below_floor if check("r8_deny_policy_threshold_below_floor")

cases.r8_deny_gallery_without_floor := {
	"input": muni_face,
	"config": {"galleries": {"pnp_watchlist": {"threshold_floor": null}}},
	"expect": expect_deny("R8"),
}

test_r8_deny_gallery_without_floor if check("r8_deny_gallery_without_floor")

# ---- R9 human review ---------------------------------------------------------------------

cases.r9_allow_face_hit_requires_review := {
	"input": muni_face,
	"expect": {"allow": true, "reasons_include": ["R9"], "obligations": {"human_review": true}},
}

test_r9_allow_face_hit_requires_review if check("r9_allow_face_hit_requires_review")

cases.r9_allow_person_confirms_alert := {"input": muni_confirm, "expect": {"allow": true, "obligations": {"human_review": true}}}

test_r9_allow_person_confirms_alert if check("r9_allow_person_confirms_alert")

cases.r9_deny_confirmation_without_person := {
	"input": patch(muni_confirm, "caller", {"operator_id": ""}),
	"expect": expect_deny("R9"),
}

test_r9_deny_confirmation_without_person if check("r9_deny_confirmation_without_person")

cases.r9_deny_edge_system_cannot_confirm := {
	"input": patch(muni_confirm, "caller", {"roles": ["operator"]}),
	"expect": expect_deny("R9"),
}

test_r9_deny_edge_system_cannot_confirm if check("r9_deny_edge_system_cannot_confirm")

# ---- R10 minimal response ----------------------------------------------------------------

cases.r10_allow_municipality_sees_minimal_fields := {
	"input": muni_face,
	"expect": {"allow": true, "obligations": {"visible_fields": [
		"alert", "reference", "offence_category", "instructions", "score",
		"requires_human_review", "decision_id",
	]}},
}

test_r10_allow_municipality_sees_minimal_fields if check("r10_allow_municipality_sees_minimal_fields")

cases.r10_allow_alert_scope_by_region := {
	"input": pnp_subscribe,
	"expect": {"allow": true, "obligations": {"alert_scope": {"level": "region", "region": "LIMA"}}},
}

test_r10_allow_alert_scope_by_region if check("r10_allow_alert_scope_by_region")

cases.r10_allow_municipality_sees_own_sites := {
	"input": object.union(muni_confirm, {"rpc": "SubscribeAlerts"}),
	"expect": {"allow": true, "obligations": {"alert_scope": {"level": "own_sites", "municipality": "muni-miraflores"}}},
}

test_r10_allow_municipality_sees_own_sites if check("r10_allow_municipality_sees_own_sites")

cases.r10_deny_municipality_investigation_list := {
	"input": object.union(muni_face, {"mode": "INVESTIGATION"}),
	"expect": expect_deny("R10"),
}

test_r10_deny_municipality_investigation_list if check("r10_deny_municipality_investigation_list")

cases.r10_deny_pnp_org_without_jurisdiction := {
	"input": patch(pnp_subscribe, "caller", {"org": "pnp-unknown"}),
	"expect": expect_deny("R10"),
}

test_r10_deny_pnp_org_without_jurisdiction if check("r10_deny_pnp_org_without_jurisdiction")

# ---- R11 no probe retention --------------------------------------------------------------

cases.r11_allow_probe_not_retained := {"input": muni_face, "expect": {"allow": true, "obligations": {"retain_non_hit_probe": false}}}

test_r11_allow_probe_not_retained if check("r11_allow_probe_not_retained")

cases.r11_deny_request_to_retain_probe := {
	"input": patch(muni_face, "requested", {"retain_probe": true}),
	"expect": expect_deny("R11"),
}

test_r11_deny_request_to_retain_probe if check("r11_deny_request_to_retain_probe")

cases.r11_deny_data_retaining_non_hits := {
	"input": muni_plate,
	"config": {"probe_retention": {"non_hit_days": 7}},
	"expect": expect_deny("R11"),
}

test_r11_deny_data_retaining_non_hits if check("r11_deny_data_retaining_non_hits")

# ---- R12 kill switch ---------------------------------------------------------------------

cases.r12_allow_plates_continue_when_faces_off := {
	"input": muni_plate,
	"config": {"framework": {"facial_matching_enabled": false}},
	"expect": expect_allow,
}

test_r12_allow_plates_continue_when_faces_off if check("r12_allow_plates_continue_when_faces_off")

cases.r12_deny_faces_when_disabled := {
	"input": muni_face,
	"config": {"framework": {"facial_matching_enabled": false}},
	"expect": {"allow": false, "reasons": ["R12"]},
}

test_r12_deny_faces_when_disabled if check("r12_deny_faces_when_disabled")

cases.r12_deny_faces_without_impact_assessment := {
	"input": muni_face,
	"config": {"framework": {"impact_assessment_id": ""}},
	"expect": expect_deny("R12"),
}

test_r12_deny_faces_without_impact_assessment if check("r12_deny_faces_without_impact_assessment")

cases.r12_deny_verify_when_disabled := {
	"input": officer_verify,
	"config": {"framework": {"facial_matching_enabled": false}},
	"expect": expect_deny("R12"),
}

test_r12_deny_verify_when_disabled if check("r12_deny_verify_when_disabled")

# ---- R13 quality and model ---------------------------------------------------------------

cases.r13_allow_quality_at_floor := {
	"input": patch(muni_face, "probe", {"quality": data.centinela_config.quality_floor.face}),
	"expect": expect_allow,
}

test_r13_allow_quality_at_floor if check("r13_allow_quality_at_floor")

cases.r13_deny_low_quality := {
	"input": patch(muni_face, "probe", {"quality": 0.2}),
	"expect": {"allow": false, "reasons": ["R13"]},
}

test_r13_deny_low_quality if check("r13_deny_low_quality")

cases.r13_deny_other_model := {
	"input": patch(muni_face, "probe", {"model_id": "facenet-128"}),
	"expect": expect_deny("R13"),
}

test_r13_deny_other_model if check("r13_deny_other_model")

cases.r13_deny_plate_probe_against_face_gallery := {
	"input": object.union(muni_plate, {"rpc": "StreamMatch", "galleries": ["pnp_watchlist"], "purpose": "WANTED_PERSON"}),
	"expect": expect_deny("R13"),
}

test_r13_deny_plate_probe_against_face_gallery if check("r13_deny_plate_probe_against_face_gallery")

cases.r13_allow_model_reported_by_server := {
	"input": patch(muni_face, "probe", {"model_id": "w600k_r50:00aa11bb22cc33dd"}),
	"dynamic": object.union(dynamic, {"models": {"pnp_watchlist": "w600k_r50:00aa11bb22cc33dd"}}),
	"expect": expect_allow,
}

test_r13_allow_model_reported_by_server if check("r13_allow_model_reported_by_server")

cases.r13_deny_model_other_than_reported := {
	"input": muni_face,
	"dynamic": object.union(dynamic, {"models": {"pnp_watchlist": "w600k_r50:00aa11bb22cc33dd"}}),
	"expect": {"allow": false, "reasons": ["R13"]},
}

test_r13_deny_model_other_than_reported if check("r13_deny_model_other_than_reported")

# ---- R14 volume --------------------------------------------------------------------------

cases.r14_allow_under_ceiling := {
	"input": muni_face,
	"expect": {"allow": true, "obligations": {"rate_ceiling": data.centinela_config.rate_ceilings.municipality}},
}

test_r14_allow_under_ceiling if check("r14_allow_under_ceiling")

cases.r14_deny_caller_over_ceiling := {
	"input": patch(muni_face, "rate", {"caller_per_minute": 100000}),
	"expect": {"allow": false, "reasons": ["R14"]},
}

test_r14_deny_caller_over_ceiling if check("r14_deny_caller_over_ceiling")

cases.r14_deny_site_over_ceiling := {
	"input": patch(muni_plate, "rate", {"site_per_minute": 100000}),
	"expect": expect_deny("R14"),
}

test_r14_deny_site_over_ceiling if check("r14_deny_site_over_ceiling")

cases.r14_deny_kind_without_ceiling := {
	"input": admin_create,
	"config": {"rate_ceilings": {"pnp": null}},
	"expect": expect_deny("R14"),
}

test_r14_deny_kind_without_ceiling if check("r14_deny_kind_without_ceiling")

# ---- R15 administration ------------------------------------------------------------------

cases.r15_allow_pnp_admin_with_warrant := {"input": admin_create, "expect": {"allow": true, "obligations": {"mode": "ADMIN"}}}

test_r15_allow_pnp_admin_with_warrant if check("r15_allow_pnp_admin_with_warrant")

cases.r15_allow_reniec_imports := {"input": reniec_import, "expect": expect_allow}

test_r15_allow_reniec_imports if check("r15_allow_reniec_imports")

cases.r15_allow_admin_list_without_reference := {
	"input": object.remove(object.union(admin_create, {"rpc": "ListRequisitions"}), ["context"]),
	"expect": {"allow": true, "obligations": {"mode": "READ"}},
}

test_r15_allow_admin_list_without_reference if check("r15_allow_admin_list_without_reference")

cases.r15_deny_change_without_reference := {
	"input": patch(admin_create, "context", {"warrant_id": " "}),
	"expect": {"allow": false, "reasons": ["R15"]},
}

test_r15_deny_change_without_reference if check("r15_deny_change_without_reference")

cases.r15_deny_municipality_creates_requisition := {
	"input": patch(admin_create, "caller", {"org": "muni-miraflores", "kind": "municipality", "roles": ["operator"]}),
	"expect": expect_deny("R15"),
}

test_r15_deny_municipality_creates_requisition if check("r15_deny_municipality_creates_requisition")

cases.r15_deny_pnp_imports_registry := {
	"input": patch(reniec_import, "caller", {"org": "pnp-dirincri", "kind": "pnp", "roles": ["admin"]}),
	"expect": expect_deny("R15"),
}

test_r15_deny_pnp_imports_registry if check("r15_deny_pnp_imports_registry")

cases.r15_deny_reniec_creates_requisition := {
	"input": patch(admin_create, "caller", {"org": "reniec", "kind": "reniec", "roles": ["admin"]}),
	"expect": expect_deny("R15"),
}

test_r15_deny_reniec_creates_requisition if check("r15_deny_reniec_creates_requisition")

# ---- R16 audit access ----------------------------------------------------------------------

cases.r16_allow_compliance_reads_audit := {
	"input": compliance_read,
	"expect": {"allow": true, "reasons_include": ["R16"], "obligations": {"mode": "READ"}},
}

test_r16_allow_compliance_reads_audit if check("r16_allow_compliance_reads_audit")

cases.r16_deny_pnp_reads_audit := {
	"input": patch(compliance_read, "caller", {"org": "pnp-dirincri", "kind": "pnp", "roles": ["admin"]}),
	"expect": expect_deny("R16"),
}

test_r16_deny_pnp_reads_audit if check("r16_deny_pnp_reads_audit")

cases.r16_deny_nobody_deletes_audit_events := {
	"input": object.union(compliance_read, {"rpc": "DeleteAuditEvent"}),
	"expect": {"allow": false, "reasons": ["DEFAULT_DENY", "R16"]},
}

test_r16_deny_nobody_deletes_audit_events if check("r16_deny_nobody_deletes_audit_events")

cases.r16_deny_nobody_rewrites_checkpoints := {
	"input": object.union(compliance_read, {"rpc": "UpdateCheckpoint"}),
	"expect": expect_deny("R16"),
}

test_r16_deny_nobody_rewrites_checkpoints if check("r16_deny_nobody_rewrites_checkpoints")

# ---- default deny and malformed input -------------------------------------------------------

cases.default_deny_unknown_rpc := {
	"input": object.union(admin_create, {"rpc": "Shutdown"}),
	"expect": {"allow": false, "reasons": ["DEFAULT_DENY"]},
}

test_default_deny_unknown_rpc if check("default_deny_unknown_rpc")

cases.malformed_missing_caller := {
	"input": object.remove(muni_face, ["caller"]),
	"expect": {"allow": false, "reasons": ["INPUT_MALFORMED"], "details_include": ["caller"]},
}

test_malformed_missing_caller if check("malformed_missing_caller")

cases.malformed_bad_time := {
	"input": patch(muni_face, "context", {"now": "yesterday"}),
	"expect": {"allow": false, "reasons": ["INPUT_MALFORMED"], "details_include": ["context.now"]},
}

test_malformed_bad_time if check("malformed_bad_time")

cases.malformed_quality_not_number := {
	"input": patch(muni_face, "probe", {"quality": "high"}),
	"expect": {"allow": false, "reasons": ["INPUT_MALFORMED"], "details_include": ["probe.quality"]},
}

test_malformed_quality_not_number if check("malformed_quality_not_number")

cases.denied_obligations_open_nothing := {
	"input": object.union(muni_face, {"galleries": ["reniec_registry"]}),
	"expect": {"allow": false, "obligations": {"galleries": [], "max_results": 0, "visible_fields": [], "min_score": {}}},
}

test_denied_obligations_open_nothing if check("denied_obligations_open_nothing")

# ---- calibration: R8 (the owner measures its floor), R12, R13, R15 -------------------------

cases.r8_allow_pnp_admin_calibrates_watchlist := {
	"input": pnp_calibrate,
	"expect": {"allow": true, "reasons": ["R8"], "obligations": {"galleries": ["pnp_watchlist"]}},
}

test_r8_allow_pnp_admin_calibrates_watchlist if check("r8_allow_pnp_admin_calibrates_watchlist")

cases.r8_deny_operator_cannot_calibrate := {
	"input": object.union(pnp_calibrate, {"caller": muni_face.caller}),
	"expect": {"allow": false, "reasons": ["R8"]},
}

test_r8_deny_operator_cannot_calibrate if check("r8_deny_operator_cannot_calibrate")

cases.r8_deny_calibrating_plates := {
	"input": object.union(pnp_calibrate, {"galleries": ["stolen_vehicles"]}),
	"expect": expect_deny("R8"),
}

test_r8_deny_calibrating_plates if check("r8_deny_calibrating_plates")

cases.r8_deny_calibrating_unknown_gallery := {
	"input": object.union(pnp_calibrate, {"galleries": ["dni_photos"]}),
	"expect": expect_deny("R8"),
}

test_r8_deny_calibrating_unknown_gallery if check("r8_deny_calibrating_unknown_gallery")

cases.r8_deny_calibration_names_one_gallery := {
	"input": object.union(pnp_calibrate, {"galleries": ["pnp_watchlist", "reniec_registry"]}),
	"expect": {"allow": false, "reasons": ["INPUT_MALFORMED"], "details_include": ["galleries"]},
}

test_r8_deny_calibration_names_one_gallery if check("r8_deny_calibration_names_one_gallery")

cases.r15_allow_reniec_calibrates_registry := {"input": reniec_calibrate, "expect": expect_allow}

test_r15_allow_reniec_calibrates_registry if check("r15_allow_reniec_calibrates_registry")

cases.r15_deny_pnp_admin_cannot_calibrate_registry := {
	"input": object.union(pnp_calibrate, {"galleries": ["reniec_registry"]}),
	"expect": {"allow": false, "reasons": ["R15"]},
}

test_r15_deny_pnp_admin_cannot_calibrate_registry if check("r15_deny_pnp_admin_cannot_calibrate_registry")

cases.r15_deny_reniec_cannot_calibrate_watchlist := {
	"input": object.union(reniec_calibrate, {"galleries": ["pnp_watchlist"]}),
	"expect": {"allow": false, "reasons": ["R15"]},
}

test_r15_deny_reniec_cannot_calibrate_watchlist if check("r15_deny_reniec_cannot_calibrate_watchlist")

cases.r12_deny_calibration_when_faces_off := {
	"input": pnp_calibrate,
	"config": {"framework": {"facial_matching_enabled": false}},
	"expect": {"allow": false, "reasons": ["R12"]},
}

test_r12_deny_calibration_when_faces_off if check("r12_deny_calibration_when_faces_off")

cases.r13_deny_calibration_of_another_model := {
	"input": patch(pnp_calibrate, "probe", {"model_id": "other-model:0000"}),
	"expect": {"allow": false, "reasons": ["R13"]},
}

test_r13_deny_calibration_of_another_model if check("r13_deny_calibration_of_another_model")
