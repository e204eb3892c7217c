"""Stamen: large language models served by a swarm of machines, behind an OpenAI API."""

__version__ = "0.1.0"
