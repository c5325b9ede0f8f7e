"""The web console: dashboard, worklist, study pages with their heat maps, the outbox.

A small server-rendered Starlette application (:mod:`dicomai.web.app`) that the node serves
from a thread (:mod:`dicomai.web.server`) when ``web.enabled``; local users only
(:mod:`dicomai.web.security`, ``dicomai users``).
"""
