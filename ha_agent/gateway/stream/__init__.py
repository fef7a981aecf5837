"""The request path: the relay routes each request to the primary and retries what
has not started (`relay`); it forwards SSE events as they complete (`sse`), moves a
stream's bytes without copying them through Python where it can (`passthrough`), and
continues a stream that broke after its first event on another node, one strategy
per generation kind (`migration`)."""
