"""Install, config, systemd and udev, enrolment, and the simulated demo cabinet."""
