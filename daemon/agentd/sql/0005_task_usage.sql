-- LLM token usage per task, summed over its attempts (`ctx.llm`), as JSON:
-- {"prompt_tokens", "completion_tokens", "total_tokens", "calls"}.
ALTER TABLE tasks ADD COLUMN usage TEXT;
