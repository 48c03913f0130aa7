"""Packaging for smartcab: ``pip install .`` gives the ``smartcab`` command."""

from setuptools import find_packages, setup

setup(
    name="smartcab",
    version="0.1.0",
    description="Open controller for RFID smart storage cabinets",
    python_requires=">=3.11",
    packages=find_packages(
        include=["firmware*", "readers*", "controller*", "web*", "provisioning*"]
    ),
    package_data={
        "web": ["templates/*.html", "static/*"],
        "provisioning": ["*.toml", "*.service", "*.rules", "*.sh"],
        "controller": ["schemas/*.json"],
        "readers": ["rfid/scenarios/*.toml"],
    },
    install_requires=[
        "gpiozero==2.0.1.post3",
        "pyserial==3.5",
        "paho-mqtt==2.2.0",
        "sqlite-utils==4.2.1",
        "flask==3.1.3",
        "nfcpy==1.0.4",
        "schedule==1.2.2",
        "waitress==3.0.2",
        "jsonschema==4.26.0",
    ],
    extras_require={
        "test": [
            "pytest==9.0.3",
            "pytest-timeout==2.4.0",
            "hypothesis==6.155.2",
            "playwright==1.65.2",
            "ruff==0.17.6",
            "pyyaml==6.0.3",
        ],
    },
    entry_points={"console_scripts": ["smartcab = controller.cli:main"]},
)
