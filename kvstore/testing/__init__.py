"""Utilities to run kvstore's real parts the way its tests and benchmarks do: agents in subprocesses
(agents.py) and vLLM engines with the connector in subprocesses (engines.py). Nothing else in the
package imports them."""
