"""centinela.audit"""
