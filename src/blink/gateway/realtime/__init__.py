"""The realtime protocol (WebSocket /v1/realtime; names and shapes after OpenAI's Realtime API, GA, text):

settings.py      SessionSettings: frozen, validated; the GA session object
protocol.py      client frames → typed, validated events (no I/O)
events.py        server events: session, items, a response's lifecycle (no I/O)
session.py       the connection: reads frames, dispatches, sends events
conversation.py  the session's items, in the session store
prompt.py        what a response's prompt is made of (instructions, retrieval, conversation); pre-load hooks
responses.py     the response in progress: start, stream, cancel, resume, close
"""
