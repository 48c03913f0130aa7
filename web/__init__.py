"""The Flask admin page and kiosk view."""
