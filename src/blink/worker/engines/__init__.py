"""Engine backends a replica can drive through one protocol (base.py): an OpenAI-compatible upstream server
(openai.py). blink's own engine runs in worker/replica.py's step loop."""
