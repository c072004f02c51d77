"""Acting in environments: env ids and wrappers, policies and experts, recording runners, evaluation."""
