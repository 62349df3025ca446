"""`make bench`: the portal against raw libvirt-python and virt-install, as ratios."""
