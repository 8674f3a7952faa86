"""centinela.policy"""
