# interim-only expectations: what the pending framework (draft-2026) would change.
package centinela_test

cases.interim_does_not_exclude_objectors := {
	"input": investigator_registry,
	"expect": {
		"allow": true, "reasons_exclude": ["R7"],
		"obligations": {"exclude_objectors": false, "objection_exempt_subjects": []},
	},
}

test_interim_does_not_exclude_objectors if check("interim_does_not_exclude_objectors")

cases.interim_single_confirmation_suffices := {
	"input": muni_confirm,
	"expect": {"allow": true, "obligations": {"two_person_confirmation": false}},
}

test_interim_single_confirmation_suffices if check("interim_single_confirmation_suffices")

cases.interim_reniec_may_record_objections := {
	"input": object.union(reniec_import, {"rpc": "RecordObjection"}),
	"expect": expect_allow,
}

test_interim_reniec_may_record_objections if check("interim_reniec_may_record_objections")
