"""The socket side: the listening socket (``listen``), the accept loop and connections (``server``),
the op table (``ops``) and the audit trail (``audit``).
"""
