"""The PLC reader process: polls Modbus tags and hands sample batches to the buffer.

Run it as `python -m processes.plc_reader --config FILE`. pymodbus is imported here and
nowhere else in the gateway.
"""
