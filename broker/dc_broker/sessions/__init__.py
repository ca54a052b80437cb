"""Getting and keeping tokens: one ``Session`` per profile (``session``) driving the pure grant flows
(``flows``) through the state table (``states``) on the refresh policy's timing (``policy``); the
registry of all sessions (``registry``); the browser login's loopback listener (``loopback``).
"""
