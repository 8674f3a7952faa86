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

# ---- the input, field by field ------------------------------------------------------------
# Every input field the policy reads is read here once. rego-cpp 1.5.2 pays ~10-25 us for
# each `input.a.b` reference but memoises rules, so this table makes a decision several times
# cheaper there; OPA is indifferent. An absent field leaves its rule undefined, exactly
# like the `input.…` reference it stands for.

caller_kind_raw := input.caller.kind
caller_operator := input.caller.operator_id
caller_org := input.caller.org
caller_role_list := input.caller.roles
ctx_authorisation_id := input.context.authorisation_id
ctx_capture_time := input.context.capture_time
ctx_confirmed_by := input.context.confirmed_by
ctx_now := input.context.now
ctx_offence := input.context.offence_category
ctx_reference := input.context.reference
ctx_site_id := input.context.site_id
ctx_warrant_id := input.context.warrant_id
in_caller := input.caller
in_context := input.context
in_galleries := input.galleries
in_mode := input.mode
in_probe := input.probe
in_purpose := input.purpose
in_rate := input.rate
in_requested := input.requested
in_rpc := input.rpc
probe_kind := input.probe.kind
probe_model := input.probe.model_id
probe_quality := input.probe.quality
rate_caller := input.rate.caller_per_minute
rate_site := input.rate.site_per_minute
req_include_inactive := input.requested.include_inactive
req_include_objectors := input.requested.include_objectors
req_max_results := input.requested.max_results
req_min_score := input.requested.min_score
req_retain_probe := input.requested.retain_probe

# Dynamic documents pushed by the server (sites, judicial authorisations); absent means empty.
sites := data.dynamic.sites if {
	is_object(data.dynamic.sites)
} else := {}

authorisations := data.dynamic.authorisations if {
	is_object(data.dynamic.authorisations)
} else := {}

# ---- the RPC and the caller ------------------------------------------------------------
# Each data.json entry the decision needs is looked up once (rego-cpp memoises rules but
# not repeated lookups, and a lookup costs about as much as a whole simple rule).

rpc := in_rpc if {
	is_string(in_rpc)
} else := ""

rpc_spec := cfg.rpcs[rpc]

rpc_known if rpc_spec

family := rpc_spec.family if {
	rpc_known
} else := "unknown"

rpc_probe_kind := rpc_spec.probe_kind if {
	is_string(rpc_spec.probe_kind)
} else := ""

rpc_write if rpc_spec.write == true

# RPCs that carry a probe (face vector or plate read) and search a gallery.
probe_rpc if family == "search"

probe_rpc if family == "verify"

caller_kind := caller_kind_raw if {
	is_string(caller_kind_raw)
} else := ""

kind_roles := roles if {
	roles := cfg.roles[caller_kind]
	is_object(roles)
} else := {}

# The role entries of the caller that grant this RPC.
grants contains grant if {
	some role in caller_role_list
	grant := kind_roles[role]
	rpc in grant.rpcs
}

granted if count(grants) > 0

# Denial when no role of the caller grants the RPC, cited with the rule governing that RPC.
deny contains rule if {
	rpc_known
	not granted
	rule := rpc_spec.rule
}

deny contains "DEFAULT_DENY" if not rpc_known

# RFC 3339 to nanoseconds. A "Z" suffix is rewritten to "+00:00" first: rego-cpp 1.5.2 does
# not parse "Z" (see tests/policy/test_engine_quirks.py); OPA parses both alike.
ts_ns(t) := time.parse_rfc3339_ns(concat("", [substring(t, 0, count(t) - 1), "+00:00"])) if {
	endswith(upper(t), "Z")
} else := time.parse_rfc3339_ns(t)

now_ns := ts_ns(ctx_now)

capture_ns := ts_ns(ctx_capture_time)

# ---- where the decision changes with the request's numbers -------------------------------
# `instants` tells the server, for each number of the input it may reuse a decision across
# (server/decision_cache.py), the values a rule compares it with: "context.now" and
# "context.capture_time" in ns since the epoch, "probe.quality" as given. All else equal,
# the decision holds for every value strictly between two neighbouring instants, or beyond
# the outer ones; at an instant it holds for that value alone. A number the policy cannot
# read (a time it cannot parse, a quality out of range) gets no entry: a decision on it
# holds only for that very input.
# Every rule that compares `now_ns`, `capture_ns` or `probe_quality` with anything must put
# what it compares it with into `now_instants`, `capture_instants` or `quality_instants`.
# The bundle tests check each case's decision at the edges of the span its instants leave
# (centinela.policy.testing). The lists are in no particular order (rego-cpp 1.5.2 sorts
# numbers as text); the server sorts them.
instants["context.now"] := [t | some t in now_instants] if now_ns

instants["context.capture_time"] := [t | some t in capture_instants] if capture_ns

instants["probe.quality"] := [q | some q in quality_instants] if valid_quality

# ---- what the decision read of the server's data ---------------------------------------------
# `reads` tells the server, for each section of data.dynamic, the keys a rule looked up in it
# (a key that is absent included): the decision depends on data.dynamic through those
# entries alone, so the server keeps it while others change (server/decision_cache.py). A
# section `reads` does not name is one no rule reads.
# Every rule that looks up an entry of `sites`, `authorisations` or `dynamic_models` must put
# the key into `site_reads`, `authorisation_reads` or `model_reads`. A rule that reads a whole
# section (iterates it, counts it) cannot be declared this way: take `reads` out of the
# decision, and the server keeps no decision across a change of data. The bundle tests
# decide each case again with every entry its decision does not name removed, changed or
# added (centinela.policy.testing).
reads := {
	"sites": sort([k | some k in site_reads]),
	"authorisations": sort([k | some k in authorisation_reads]),
	"models": sort([k | some k in model_reads]),
}

req_galleries contains g if {
	probe_rpc
	some g in in_galleries
	is_string(g)
}

# ---- well-formedness ------------------------------------------------------------------

probe_modes := {"ALERT", "INVESTIGATION", "VERIFY"}

probe_kinds := {"face", "plate"}

malformed contains "input" if not is_object(input)

malformed contains "caller" if {
	is_object(input)
	not valid_caller
}

valid_caller if {
	is_string(caller_org)
	caller_org != ""
	kind_roles != {}
	is_array(caller_role_list)
	every role in caller_role_list {
		is_string(role)
	}
}

malformed contains "rpc" if {
	is_object(input)
	rpc == ""
}

malformed contains "purpose" if {
	in_purpose != null
	not is_string(in_purpose)
}

malformed contains "galleries" if {
	probe_rpc
	not valid_galleries
}

valid_galleries if {
	is_array(in_galleries)
	count(in_galleries) > 0
	every g in in_galleries {
		is_string(g)
	}
}

malformed contains "mode" if {
	probe_rpc
	not in_mode in probe_modes
}

malformed contains "probe" if {
	probe_rpc
	not is_object(in_probe)
}

malformed contains "probe.kind" if {
	probe_rpc
	is_object(in_probe)
	not probe_kind in probe_kinds
}

# MatchFace carries a face, MatchPlate a plate; StreamMatch either.
malformed contains "probe.kind" if {
	probe_rpc
	rpc_probe_kind != ""
	probe_kind in probe_kinds
	probe_kind != rpc_probe_kind
}

malformed contains "probe.quality" if {
	probe_rpc
	is_object(in_probe)
	not valid_quality
}

valid_quality if {
	is_number(probe_quality)
	probe_quality >= 0
	probe_quality <= 1
}

quality_instants contains 0

quality_instants contains 1

malformed contains "probe.model_id" if {
	probe_rpc
	is_object(in_probe)
	not valid_model
}

valid_model if is_string(probe_model)

malformed contains "context" if {
	probe_rpc
	not is_object(in_context)
}

malformed contains "context" if {
	in_context != null
	not is_object(in_context)
}

# A search names the site the probe comes from; a 1:1 verification may come from no site
# (an officer in the street; absent, null and "" alike), but a site it names must be valid.
malformed contains "context.site_id" if {
	family == "search"
	is_object(in_context)
	not valid_site_id
}

malformed contains "context.site_id" if {
	family == "verify"
	site := ctx_site_id
	not blank(site)
	not valid_site_id
}

valid_site_id if {
	is_string(ctx_site_id)
	ctx_site_id != ""
}

malformed contains "context.now" if {
	probe_rpc
	is_object(in_context)
	not now_ns
}

malformed contains "context.capture_time" if {
	family == "search"
	is_object(in_context)
	not capture_ns
}

malformed contains "context.capture_time" if {
	family == "verify"
	t := ctx_capture_time
	not blank(t)
	not capture_ns
}

blank(x) if x == null

blank(x) if x == ""

# The request rate is optional: the server may enforce the ``rate_ceiling`` obligation
# itself (it does, so that decisions can be cached, see server/decision_cache.py); when a
# rate is given it must be well-formed and is enforced here too (R14).
malformed contains "rate" if {
	in_rate != null
	not valid_rate
}

valid_rate if {
	is_number(rate_caller)
	is_number(rate_site)
}

malformed contains "requested" if {
	in_requested != null
	not is_object(in_requested)
}

malformed contains "requested.max_results" if {
	probe_rpc
	req_max_results != null
	not valid_max_results
}

valid_max_results if {
	is_number(req_max_results)
	req_max_results >= 1
	floor(req_max_results) == req_max_results
}

malformed contains "requested.min_score" if {
	probe_rpc
	req_min_score != null
	not valid_min_score
}

valid_min_score if {
	is_number(req_min_score)
	req_min_score >= 0
	req_min_score <= 1
}

non_empty_string(s) if {
	is_string(s)
	trim_space(s) != ""
}
