"""vmesh DNS benchmark: vmesh vs Envoy's native dns_filter vs dnsmasq, measured with dnsperf."""
