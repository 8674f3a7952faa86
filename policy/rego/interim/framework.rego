# What differs between the interim bundle and the pending framework (draft-2026).
#
# interim: there is no objection procedure in force yet, so searches do NOT exclude people
# who filed an objection with Reniec (R7 is a draft-2026 rule; Reniec may still record
# objections, so they take effect the day the framework does). An alert needs human review
# (R9) but one confirmation suffices.
package centinela

objections_in_force := false

two_person_in_force := false

exclude_objectors := false

objection_exempt_subjects := []

two_person_confirmation := false
