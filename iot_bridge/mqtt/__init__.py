"""MQTT ingress for local hubs: a sans-I/O MQTT 3.1.1 client, the hub payload and topic rules, and the driver."""
