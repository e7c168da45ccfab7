"""Ray actor replica owning one LLMEngine and its TP group (arrives with the serving layer)."""
