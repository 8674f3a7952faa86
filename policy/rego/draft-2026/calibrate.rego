# Calibration: a face gallery's owner measures its false-positive identification rate
# (CalibrateGallery).
#
# Rules: R8 thresholds (the floor is set from the owner's own non-mated searches), R12 kill
# switch, R13 model, R15 administration (each owner calibrates only its own gallery).
#
# Invariants:
#   * Exactly one gallery per call, a face gallery with a calibrated floor to compare with.
#   * Only a role that lists the gallery under `galleries` and grants CalibrateGallery may
#     calibrate it: PNP administrators the watchlist, Reniec the registry (R15).
#   * Calibration searches faces, so it stops with facial matching (R12), and its templates
#     must be of the gallery's model (R13).
package centinela

calibrate_rpc if family == "calibrate"

req_galleries contains g if {
	calibrate_rpc
	some g in in_galleries
	is_string(g)
}

malformed contains "galleries" if {
	calibrate_rpc
	not valid_galleries
}

malformed contains "galleries" if {
	calibrate_rpc
	valid_galleries
	count(in_galleries) != 1
}

malformed contains "probe" if {
	calibrate_rpc
	not is_object(in_probe)
}

# Not an owner of this gallery.
deny contains "R15" if {
	calibrate_rpc
	granted
	some g in req_galleries
	not g in allowed_galleries
}

# Unknown, not a face gallery, or without a calibrated floor to measure against.
deny contains "R8" if {
	calibrate_rpc
	some g in req_galleries
	not calibratable(g)
}

calibratable(g) if {
	spec := gallery_specs[g]
	spec.kind == "face"
	calibrated(spec)
}

deny contains "R12" if {
	calibrate_rpc
	not facial_matching_enabled
}

deny contains "R13" if {
	calibrate_rpc
	some g, spec in gallery_specs
	model := gallery_model(g, spec)
	model != probe_model
}
