"""Deployment on Flower's Deployment Engine: PKI for TLS and node authentication, the local demo."""
