# What differs between the pending framework (draft-2026) and the interim bundle.
#
# R7: a person who filed an objection is excluded from registry 1:N searches unless the
# judicial authorisation names that person; an objection never removes an active
# requisitoria (the watchlist is not affected). The matcher applies the exclusion; the policy
# says when (`exclude_objectors`) and whom to spare (`objection_exempt_subjects`).
# R9: an alert is actionable only after two distinct authorised people confirm it.
package centinela

objections_in_force := true

two_person_in_force := true

default exclude_objectors := false

exclude_objectors if {
	cfg.framework.objections_enforced == true
	registry_search
}

objection_exempt_subjects := sort([s | some s in authorisation.subjects; is_string(s)]) if {
	exclude_objectors
	is_array(authorisation.subjects)
} else := []

default two_person_confirmation := false

two_person_confirmation if {
	cfg.framework.two_person_confirmation == true
	human_review
	mode in {"ALERT", "INVESTIGATION"}
}

# Nobody may ask to see objectors.
deny contains "R7" if {
	probe_rpc
	req_include_objectors == true
}

# The second confirmation must come from another person.
deny contains "R9" if {
	cfg.framework.two_person_confirmation == true
	rpc == "ConfirmAlert"
	some who in ctx_confirmed_by
	who == caller_operator
}
