"""pi_eval"""
