# The request: what RPC, which caller, which of the caller's roles grant it, and whether the
# input is well formed (INPUT_MALFORMED otherwise).
#
# Invariants:
#   * A top-level key that is absent and one that is null mean the same thing.
#   * `grants` only ever holds role entries of the caller's own kind that list this RPC; an
#     RPC name that is not in data.centinela_config.rpcs is never granted (DEFAULT_DENY).
#   * `malformed` names fields, never values.
package centinela

cfg := data.centinela_config

# Dynamic documents pushed by the server (sites, judicial authorisations); absent means empty.
sites := data.dynamic.sites if {
	is_object(data.dynamic.sites)
} else := {}

authorisations := data.dynamic.authorisations if {
	is_object(data.dynamic.authorisations)
} else := {}

rpc := input.rpc if {
	is_string(input.rpc)
} else := ""

rpc_known if cfg.rpcs[rpc]

family := cfg.rpcs[rpc].family if {
	rpc_known
} else := "unknown"

# RPCs that carry a probe (face vector or plate read) and search a gallery.
probe_rpc if family == "search"

probe_rpc if family == "verify"

caller_kind := input.caller.kind if {
	is_string(input.caller.kind)
} else := ""

caller_roles contains role if {
	some role in input.caller.roles
	is_string(role)
}

# The role entries of the caller that grant this RPC.
grants contains grant if {
	some role in caller_roles
	grant := cfg.roles[caller_kind][role]
	rpc in grant.rpcs
}

# Denial when no role of the caller grants the RPC, cited with the rule governing that RPC.
deny contains rule if {
	rpc_known
	count(grants) == 0
	rule := cfg.rpcs[rpc].rule
}

deny contains "DEFAULT_DENY" if not rpc_known

present(x) if {
	x != null
}

valid_time(t) if {
	_ := ts_ns(t)
}

# RFC 3339 to nanoseconds. A "Z" suffix is rewritten to "+00:00" first: rego-cpp 1.5.2 does
# not parse "Z" (see tests/policy/test_engine_quirks.py); OPA parses both alike.
ts_ns(t) := time.parse_rfc3339_ns(concat("", [substring(t, 0, count(t) - 1), "+00:00"])) if {
	is_string(t)
	upper(substring(t, count(t) - 1, 1)) == "Z"
} else := time.parse_rfc3339_ns(t) if {
	is_string(t)
}

non_empty_string(s) if {
	is_string(s)
	trim_space(s) != ""
}

now_ns := ts_ns(input.context.now)

capture_ns := ts_ns(input.context.capture_time)

req_galleries contains g if {
	probe_rpc
	some g in input.galleries
	is_string(g)
}

# ---- well-formedness ------------------------------------------------------------------

malformed contains "input" if not is_object(input)

malformed contains "caller" if {
	is_object(input)
	not valid_caller
}

malformed contains "rpc" if {
	is_object(input)
	not non_empty_string(input.rpc)
}

malformed contains "purpose" if {
	present(input.purpose)
	not is_string(input.purpose)
}

valid_caller if {
	is_object(input.caller)
	non_empty_string(input.caller.org)
	cfg.roles[caller_kind]
	is_array(input.caller.roles)
	every role in input.caller.roles {
		is_string(role)
	}
}

malformed contains "galleries" if {
	probe_rpc
	not valid_galleries
}

valid_galleries if {
	is_array(input.galleries)
	count(input.galleries) > 0
	every g in input.galleries {
		is_string(g)
	}
}

malformed contains "mode" if {
	probe_rpc
	not input.mode in {"ALERT", "INVESTIGATION", "VERIFY"}
}

malformed contains "probe" if {
	probe_rpc
	not is_object(input.probe)
}

malformed contains "probe.kind" if {
	probe_rpc
	is_object(input.probe)
	not input.probe.kind in {"face", "plate"}
}

# MatchFace carries a face, MatchPlate a plate; StreamMatch either.
malformed contains "probe.kind" if {
	probe_rpc
	expected := cfg.rpcs[rpc].probe_kind
	expected != ""
	input.probe.kind in {"face", "plate"}
	input.probe.kind != expected
}

malformed contains "probe.quality" if {
	probe_rpc
	is_object(input.probe)
	not valid_quality
}

valid_quality if {
	is_number(input.probe.quality)
	input.probe.quality >= 0
	input.probe.quality <= 1
}

malformed contains "probe.model_id" if {
	probe_rpc
	is_object(input.probe)
	not non_empty_string(input.probe.model_id)
}

malformed contains "context" if {
	probe_rpc
	not is_object(input.context)
}

malformed contains "context" if {
	present(input.context)
	not is_object(input.context)
}

malformed contains "context.site_id" if {
	probe_rpc
	is_object(input.context)
	not non_empty_string(input.context.site_id)
}

malformed contains "context.now" if {
	probe_rpc
	is_object(input.context)
	not valid_time(input.context.now)
}

malformed contains "context.capture_time" if {
	probe_rpc
	is_object(input.context)
	not valid_time(input.context.capture_time)
}

malformed contains "rate" if {
	probe_rpc
	not valid_rate
}

malformed contains "rate" if {
	present(input.rate)
	not valid_rate
}

valid_rate if {
	is_object(input.rate)
	is_number(input.rate.caller_per_minute)
	is_number(input.rate.site_per_minute)
}

malformed contains "requested" if {
	present(input.requested)
	not is_object(input.requested)
}

malformed contains "requested.max_results" if {
	probe_rpc
	present(input.requested.max_results)
	not valid_max_results
}

valid_max_results if {
	is_number(input.requested.max_results)
	input.requested.max_results >= 1
	floor(input.requested.max_results) == input.requested.max_results
}

malformed contains "requested.min_score" if {
	probe_rpc
	present(input.requested.min_score)
	not valid_min_score
}

valid_min_score if {
	is_number(input.requested.min_score)
	input.requested.min_score >= 0
	input.requested.min_score <= 1
}
