# Fixtures and helpers shared by this bundle's tests.
#
# The tests are table-driven: every `test_<name>` rule is `check("<name>")`, and
# `cases.<name>` holds the input, optional overrides (`dynamic` replaces data.dynamic,
# `config` is merged into data.centinela_config) and the expectation. OPA runs the test rules
# as usual (`with input as …`). The embedded runner (centinela.policy.Bundle.run_tests)
# evaluates the very same cases through the compiled entry point and then `embedded_check`,
# because rego-cpp 1.5.2 cannot run `with input as …` on this policy: a whole-input `with`
# fails to compile when the target depends on other rules, and a per-key `with` takes
# seconds and gigabytes to compile (see tests/policy/test_engine_quirks.py).
package centinela_test

# The expectation language: allow; reasons (exact), reasons_include, reasons_exclude;
# details_include; obligations (each named field equal); min_score_at_least (per gallery);
# visible_fields_exclude.
matches(d, e) if {
	d.allow == e.allow
	every r in object.get(e, "reasons_include", []) {
		r in d.reasons
	}
	every r in object.get(e, "reasons_exclude", []) {
		not r in d.reasons
	}
	every r in object.get(e, "details_include", []) {
		r in d.details
	}
	every k, v in object.get(e, "obligations", {}) {
		d.obligations[k] == v
	}
	every g, v in object.get(e, "min_score_at_least", {}) {
		d.obligations.min_score[g] >= v
	}
	every f in object.get(e, "visible_fields_exclude", []) {
		not f in d.obligations.visible_fields
	}
	exact_reasons(d, e)
}

exact_reasons(d, e) if not "reasons" in object.keys(e)

exact_reasons(d, e) if d.reasons == e.reasons

# Used by the embedded runner: input is {"decision": …, "expect": …}.
embedded_check := matches(input.decision, input.expect)

expect_allow := {"allow": true}

# Merge `p` into the object at `obj[key]`. Spelled out rather than relying on object.union
# merging nested objects: OPA's does, rego-cpp 1.5.2's does not.
patch(obj, key, p) := object.union(obj, {key: object.union(object.get(obj, key, {}), p)})

expect_deny(rule) := {"allow": false, "reasons_include": [rule]}

dynamic := {
	"sites": {
		"mira-cam-001": {"municipality": "muni-miraflores", "region": "LIMA", "active": true},
		"mira-cam-009": {"municipality": "muni-miraflores", "region": "LIMA", "active": false},
		"surco-cam-001": {"municipality": "muni-surco", "region": "LIMA", "active": true},
		"pnp-van-12": {"municipality": "pnp-lima", "region": "LIMA", "active": true},
	},
	"authorisations": {
		"AUT-2026-0001": {
			"court": "1er Juzgado de Investigacion Preparatoria de Lima",
			"sites": ["mira-cam-001", "pnp-van-12"],
			"not_before": "2026-02-01T00:00:00Z",
			"not_after": "2026-04-01T00:00:00Z",
			"offences": ["ROBO_AGRAVADO"],
			"subjects": ["subj-7f3a", "subj-91c2"],
			"revoked": false,
		},
		"AUT-2026-0002": {
			"court": "2do Juzgado de Investigacion Preparatoria de Lima",
			"sites": ["pnp-van-12"],
			"not_before": "2026-01-01T00:00:00Z",
			"not_after": "2026-02-15T00:00:00Z",
			"offences": ["ROBO_AGRAVADO"],
			"subjects": [],
			"revoked": false,
		},
		"AUT-2026-0003": {
			"court": "1er Juzgado de Investigacion Preparatoria de Lima",
			"sites": ["pnp-van-12"],
			"not_before": "2026-02-01T00:00:00Z",
			"not_after": "2026-04-01T00:00:00Z",
			"offences": ["ROBO_AGRAVADO"],
			"subjects": [],
			"revoked": true,
		},
	},
}

rate_ok := {"caller_per_minute": 12, "site_per_minute": 4}

muni_face := {
	"caller": {"org": "muni-miraflores", "kind": "municipality", "roles": ["operator"], "operator_id": "edge-01"},
	"rpc": "MatchFace",
	"purpose": "WANTED_PERSON",
	"context": {"site_id": "mira-cam-001", "capture_time": "2026-03-01T10:00:00Z", "now": "2026-03-01T10:00:01Z"},
	"galleries": ["pnp_watchlist"],
	"mode": "ALERT",
	"requested": {"max_results": 3, "min_score": 0},
	"probe": {"kind": "face", "quality": 0.91, "model_id": "w600k_mbf:9cc6e4a75f0e2bf0"},
	"rate": rate_ok,
}

muni_plate := {
	"caller": {"org": "muni-miraflores", "kind": "municipality", "roles": ["operator"], "operator_id": "portico-3"},
	"rpc": "MatchPlate",
	"purpose": "STOLEN_VEHICLE",
	"context": {"site_id": "mira-cam-001", "capture_time": "2026-03-01T10:00:00Z", "now": "2026-03-01T10:00:01Z"},
	"galleries": ["stolen_vehicles"],
	"mode": "ALERT",
	"requested": {"max_results": 1},
	"probe": {"kind": "plate", "quality": 0.8, "model_id": ""},
	"rate": rate_ok,
}

investigator_registry := {
	"caller": {"org": "pnp-lima", "kind": "pnp", "roles": ["investigator"], "operator_id": "pnp-inv-204"},
	"rpc": "MatchFace",
	"purpose": "JUDICIAL_INVESTIGATION",
	"context": {
		"site_id": "pnp-van-12", "capture_time": "2026-03-01T10:00:00Z", "now": "2026-03-01T10:05:00Z",
		"authorisation_id": "AUT-2026-0001", "offence_category": "ROBO_AGRAVADO",
	},
	"galleries": ["reniec_registry"],
	"mode": "INVESTIGATION",
	"requested": {"max_results": 20},
	"probe": {"kind": "face", "quality": 0.88, "model_id": "w600k_mbf:9cc6e4a75f0e2bf0"},
	"rate": rate_ok,
}

officer_verify := {
	"caller": {"org": "pnp-lima", "kind": "pnp", "roles": ["officer"], "operator_id": "pnp-off-77"},
	"rpc": "VerifyFace",
	"purpose": "IDENTITY_VERIFICATION",
	"context": {"site_id": "pnp-van-12", "capture_time": "2026-03-01T10:00:00Z", "now": "2026-03-01T10:00:02Z"},
	"galleries": ["reniec_registry"],
	"mode": "VERIFY",
	"probe": {"kind": "face", "quality": 0.93, "model_id": "w600k_mbf:9cc6e4a75f0e2bf0"},
	"rate": rate_ok,
}

admin_create := {
	"caller": {"org": "pnp-dirincri", "kind": "pnp", "roles": ["admin"], "operator_id": "pnp-adm-3"},
	"rpc": "CreateRequisition",
	"context": {"now": "2026-03-01T10:00:00Z", "warrant_id": "REQ-2026-004512"},
	"rate": {"caller_per_minute": 2, "site_per_minute": 0},
}

reniec_import := {
	"caller": {"org": "reniec", "kind": "reniec", "roles": ["admin"], "operator_id": "rnc-ops-1"},
	"rpc": "ImportTemplates",
	"context": {"now": "2026-03-01T10:00:00Z", "reference": "RENIEC-OF-2026-118"},
}

compliance_read := {
	"caller": {"org": "defensoria", "kind": "compliance", "roles": ["officer"], "operator_id": "cmp-9"},
	"rpc": "ListEvents",
	"context": {"now": "2026-03-01T10:00:00Z"},
}

muni_confirm := {
	"caller": {"org": "muni-miraflores", "kind": "municipality", "roles": ["control_center"], "operator_id": "serenazgo-14"},
	"rpc": "ConfirmAlert",
	"context": {"site_id": "mira-cam-001", "now": "2026-03-01T10:01:00Z", "confirmed_by": []},
}

pnp_subscribe := {
	"caller": {"org": "pnp-lima", "kind": "pnp", "roles": ["control_center"], "operator_id": "pnp-cc-2"},
	"rpc": "SubscribeAlerts",
	"context": {"now": "2026-03-01T10:00:00Z"},
}

pnp_calibrate := {
	"caller": {"org": "pnp-dirincri", "kind": "pnp", "roles": ["admin"], "operator_id": "pnp-adm-3"},
	"rpc": "CalibrateGallery",
	"context": {"now": "2026-03-01T10:00:00Z", "reference": "CAL-2026-07"},
	"galleries": ["pnp_watchlist"],
	"probe": {"kind": "face", "model_id": "w600k_mbf:9cc6e4a75f0e2bf0"},
	"rate": {"caller_per_minute": 1, "site_per_minute": 0},
}

reniec_calibrate := object.union(pnp_calibrate, {
	"caller": {"org": "reniec", "kind": "reniec", "roles": ["admin"], "operator_id": "rnc-ops-1"},
	"galleries": ["reniec_registry"],
})
