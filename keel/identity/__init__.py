"""Users, teams, roles, API keys and the secrets vault."""
