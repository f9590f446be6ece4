"""smtpfleet.inbound"""
