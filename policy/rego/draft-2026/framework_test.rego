# draft-2026 rules: R7 objections and R9 two-person confirmation.
package centinela_test

cases.r7_allow_registry_search_excludes_objectors := {
	"input": investigator_registry,
	"expect": {
		"allow": true, "reasons_include": ["R3", "R7"],
		"obligations": {"exclude_objectors": true, "objection_exempt_subjects": ["subj-7f3a", "subj-91c2"]},
	},
}

test_r7_allow_registry_search_excludes_objectors if check("r7_allow_registry_search_excludes_objectors")

cases.r7_allow_objection_never_removes_requisitoria := {
	"input": muni_face,
	"expect": {"allow": true, "reasons_exclude": ["R7"], "obligations": {"exclude_objectors": false}},
}

test_r7_allow_objection_never_removes_requisitoria if check("r7_allow_objection_never_removes_requisitoria")

cases.r7_allow_verification_not_affected := {"input": officer_verify, "expect": {"allow": true, "obligations": {"exclude_objectors": false}}}

test_r7_allow_verification_not_affected if check("r7_allow_verification_not_affected")

cases.r7_deny_request_to_include_objectors := {
	"input": patch(investigator_registry, "requested", {"include_objectors": true}),
	"expect": expect_deny("R7"),
}

test_r7_deny_request_to_include_objectors if check("r7_deny_request_to_include_objectors")

cases.r9_allow_alert_needs_two_confirmations := {
	"input": muni_face,
	"expect": {"allow": true, "obligations": {"human_review": true, "two_person_confirmation": true}},
}

test_r9_allow_alert_needs_two_confirmations if check("r9_allow_alert_needs_two_confirmations")

cases.r9_allow_second_person_confirms := {
	"input": patch(muni_confirm, "context", {"confirmed_by": ["serenazgo-02"]}),
	"expect": {"allow": true, "obligations": {"two_person_confirmation": true}},
}

test_r9_allow_second_person_confirms if check("r9_allow_second_person_confirms")

cases.r9_deny_same_person_confirms_twice := {
	"input": patch(muni_confirm, "context", {"confirmed_by": ["serenazgo-14"]}),
	"expect": {"allow": false, "reasons": ["R9"]},
}

test_r9_deny_same_person_confirms_twice if check("r9_deny_same_person_confirms_twice")

cases.draft_alert_threshold_raised := {
	"input": muni_face,
	"expect": {"allow": true, "obligations": {"min_score": {"pnp_watchlist": 0.45}, "max_results": 3}},
}

test_draft_alert_threshold_raised if check("draft_alert_threshold_raised")
