"""Accounts and access: users, passwords and sessions, the roles and the ownership rule, the audit trail."""
