"""centinela.clients"""
