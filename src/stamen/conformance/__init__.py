"""Reusable conformance suites: block adapters, transports, the OpenAI API contract."""
