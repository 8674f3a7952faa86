# Alerts, administration, audit, and request volume.
#
# Rules: R9 human review (who may confirm an alert), R10 alert visibility by jurisdiction,
# R14 volume ceilings, R15 administration, R16 audit access.
#
# Invariants:
#   * Every state-changing administrative RPC cites a warrant or reference id (R15).
#   * Audit RPCs are read-only and granted to compliance only; no RPC alters audit records,
#     and an unknown RPC whose name reads as an audit mutation is denied citing R16.
#   * A caller kind without a rate ceiling in data is denied (R14 fails closed).
package centinela

# ---- R9: a person, not a system, confirms an alert ---------------------------------------

deny contains "R9" if {
	rpc == "ConfirmAlert"
	not non_empty_string(input.caller.operator_id)
}

# ---- R10: alert visibility by jurisdiction -------------------------------------------------

alert_scope := {"level": "own_sites", "municipality": input.caller.org} if {
	family == "alert"
	cfg.alert_visibility[caller_kind] == "own_sites"
	non_empty_string(input.caller.org)
} else := {"level": "national"} if {
	family == "alert"
	cfg.alert_visibility[caller_kind] == "region"
	input.caller.org in cfg.alert_visibility.national_orgs
} else := {"level": "region", "region": region} if {
	family == "alert"
	cfg.alert_visibility[caller_kind] == "region"
	region := cfg.alert_visibility.org_regions[input.caller.org]
	non_empty_string(region)
} else := null

deny contains "R10" if {
	family == "alert"
	count(grants) > 0
	alert_scope == null
}

# ---- R14: volume ------------------------------------------------------------------------

rate_ceiling := {
	"caller_per_minute": ceiling.caller_per_minute,
	"site_per_minute": ceiling.site_per_minute,
} if {
	ceiling := cfg.rate_ceilings[caller_kind]
	is_number(ceiling.caller_per_minute)
	is_number(ceiling.site_per_minute)
} else := {"caller_per_minute": 0, "site_per_minute": 0}

deny contains "R14" if {
	rpc_known
	count(grants) > 0
	rate_ceiling.caller_per_minute < 1
}

deny contains "R14" if {
	is_number(input.rate.caller_per_minute)
	input.rate.caller_per_minute > rate_ceiling.caller_per_minute
}

deny contains "R14" if {
	is_number(input.rate.site_per_minute)
	input.rate.site_per_minute > rate_ceiling.site_per_minute
}

# ---- R15: administration ------------------------------------------------------------------

admin_write if {
	family == "admin"
	cfg.rpcs[rpc].write == true
}

reference_cited if non_empty_string(input.context.reference)

reference_cited if non_empty_string(input.context.warrant_id)

deny contains "R15" if {
	admin_write
	not reference_cited
}

# ---- R16: audit access; nobody alters audit records ----------------------------------------

audit_mutation if {
	some prefix in cfg.audit_mutation_prefixes
	startswith(rpc, prefix)
	some target in cfg.audit_mutation_targets
	contains(rpc, target)
}

deny contains "R16" if {
	not rpc_known
	audit_mutation
}
