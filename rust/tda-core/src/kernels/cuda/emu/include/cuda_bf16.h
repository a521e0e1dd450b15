// emulation: see emu.h
