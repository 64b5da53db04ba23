# Stage n2g: rules are added by its issue (see docs/architecture.md, "Stages").
