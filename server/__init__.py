"""centinela.server"""
