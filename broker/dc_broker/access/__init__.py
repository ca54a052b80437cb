"""Who is calling and what they may do: the caller's identity from the kernel (``identity``), the
allow/admin rules (``rules``), the ``Caller`` of one connection (``caller``) and the decisions built
from them (``authorize``). The server builds a ``Caller``; the ops ask ``authorize``.
"""
