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
	not non_empty_string(caller_operator)
}

# ---- R10: alert visibility by jurisdiction -------------------------------------------------

visibility := cfg.alert_visibility[caller_kind]

alert_scope := {"level": "own_sites", "municipality": caller_org} if {
	family == "alert"
	visibility == "own_sites"
	non_empty_string(caller_org)
} else := {"level": "national"} if {
	family == "alert"
	visibility == "region"
	caller_org in cfg.alert_visibility.national_orgs
} else := {"level": "region", "region": region} if {
	family == "alert"
	visibility == "region"
	region := cfg.alert_visibility.org_regions[caller_org]
	non_empty_string(region)
} else := null

deny contains "R10" if {
	family == "alert"
	granted
	alert_scope == null
}

# ---- R14: volume ------------------------------------------------------------------------

ceiling_spec := cfg.rate_ceilings[caller_kind]

rate_ceiling := {
	"caller_per_minute": ceiling_spec.caller_per_minute,
	"site_per_minute": ceiling_spec.site_per_minute,
} if {
	is_number(ceiling_spec.caller_per_minute)
	is_number(ceiling_spec.site_per_minute)
} else := {"caller_per_minute": 0, "site_per_minute": 0}

deny contains "R14" if {
	granted
	not rate_ceiling.caller_per_minute >= 1
}

deny contains "R14" if {
	rate_caller > rate_ceiling.caller_per_minute
}

deny contains "R14" if {
	rate_site > rate_ceiling.site_per_minute
}

# ---- R15: administration ------------------------------------------------------------------

admin_write if {
	family == "admin"
	rpc_write
}

reference_cited if non_empty_string(ctx_reference)

reference_cited if non_empty_string(ctx_warrant_id)

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
