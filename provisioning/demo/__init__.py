"""Demo artifacts: a tiny real guest that installs itself, for end-to-end provisioning."""
