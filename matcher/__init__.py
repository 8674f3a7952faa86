"""centinela.matcher"""
