"""Services: every write the portal makes, named <entity>_<action>."""
