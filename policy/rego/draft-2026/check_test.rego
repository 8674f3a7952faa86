# How OPA runs a test case: with the case's input and data overrides.
#
# The embedded runner (centinela.policy.Bundle.run_tests) does not load this file; it puts a
# stub in its place and evaluates `cases` through the compiled entry point instead, because
# rego-cpp 1.5.2 cannot compile the whole-input `with` below on this policy (see
# fixtures_test.rego and tests/policy/test_engine_quirks.py). Keep this file the only place
# that uses `with`.
package centinela_test

import data.centinela

check(name) if {
	c := cases[name]
	d := decide_case(c)
	matches(d, object.get(c, "expect", {}))
}

decide_case(c) := d if {
	d := centinela.decision with input as c.input
		with data.dynamic as object.get(c, "dynamic", dynamic)
		with data.centinela_config as object.union(data.centinela_config, object.get(c, "config", {}))
}
