"""Dashboard pages: groups, members, invites, tokens, overview, agents & devices, approvals."""
